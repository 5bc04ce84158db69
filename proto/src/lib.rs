//! Envoy v3 API types for Legate.
//!
//! The message types come from the `envoy-types` crate (re-exported as [`pb`]). This crate adds
//! their descriptors, so that configuration written in Envoy's proto3 JSON/YAML mapping
//! (including `typed_config` with `"@type"`) decodes exactly as Envoy decodes it, and so that
//! resources can be printed back as JSON for `/config_dump`.

use std::sync::Mutex;

pub use envoy_types::pb;
pub use prost_reflect::{
    DescriptorPool, DynamicMessage, MapKey, MessageDescriptor, ReflectMessage, Value,
};

/// Prefix of every `Any` type URL.
pub const TYPE_URL_PREFIX: &str = "type.googleapis.com/";

static DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/envoy_descriptors.bin"));
/// The decoded pool is large (several MB); it is kept only while configuration is being read
/// and released afterwards (see [`release_pool`]), so an idle proxy does not carry it.
static POOL: Mutex<Option<DescriptorPool>> = Mutex::new(None);

/// Errors from decoding or encoding Envoy messages.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("descriptor pool: {0}")]
    Pool(String),
    #[error("unknown message type {0}")]
    UnknownType(String),
    #[error("{0}")]
    Json(String),
    #[error("{type_name}: {reason}")]
    Decode { type_name: String, reason: String },
}

/// The descriptor pool of every Envoy message Legate knows (decoded on first use; a cheap
/// handle).
pub fn pool() -> Result<DescriptorPool, ProtoError> {
    let mut slot = POOL
        .lock()
        .map_err(|_| ProtoError::Pool("poisoned".into()))?;
    if let Some(p) = slot.as_ref() {
        return Ok(p.clone());
    }
    let mut p = DescriptorPool::decode(DESCRIPTORS).map_err(|e| ProtoError::Pool(e.to_string()))?;
    for file in typed_struct_files() {
        p.add_file_descriptor_proto(file)
            .map_err(|e| ProtoError::Pool(e.to_string()))?;
    }
    *slot = Some(p.clone());
    Ok(p)
}

/// The message names of `TypedStruct` (`xds.type.v3` and its older `udpa.type.v1` twin): an
/// extension's configuration as its type URL plus a `google.protobuf.Struct` holding its
/// proto3 JSON, which is how Envoy accepts configuration for extensions whose descriptors it
/// does not link in.
pub const TYPED_STRUCT_TYPES: [&str; 2] = ["xds.type.v3.TypedStruct", "udpa.type.v1.TypedStruct"];

/// `TypedStruct` as a typed message (both packages share the wire format).
#[derive(Clone, PartialEq, prost::Message)]
pub struct TypedStruct {
    /// The type URL of the message the `value` describes.
    #[prost(string, tag = "1")]
    pub type_url: String,
    /// The message in its proto3 JSON form.
    #[prost(message, optional, tag = "2")]
    pub value: Option<pb::google::protobuf::Struct>,
}

/// The descriptors of the two `TypedStruct` messages. `envoy-types` ships neither the
/// `.proto` files nor the types, so they are described here field by field (two fields, from
/// the xDS API reference) and added to the pool.
fn typed_struct_files() -> Vec<prost_types::FileDescriptorProto> {
    use prost_types::field_descriptor_proto::{Label, Type};
    use prost_types::{DescriptorProto, FieldDescriptorProto, FileDescriptorProto};
    let field = |name: &str, number: i32, ty: Type, type_name: Option<&str>| FieldDescriptorProto {
        name: Some(name.to_owned()),
        number: Some(number),
        label: Some(Label::Optional as i32),
        r#type: Some(ty as i32),
        type_name: type_name.map(str::to_owned),
        json_name: Some(if name == "type_url" { "typeUrl" } else { name }.to_owned()),
        ..Default::default()
    };
    [
        ("xds/type/v3/typed_struct.proto", "xds.type.v3"),
        ("udpa/type/v1/typed_struct.proto", "udpa.type.v1"),
    ]
    .into_iter()
    .map(|(file, package)| FileDescriptorProto {
        name: Some(format!("legate/{file}")),
        package: Some(package.to_owned()),
        dependency: vec!["google/protobuf/struct.proto".to_owned()],
        message_type: vec![DescriptorProto {
            name: Some("TypedStruct".to_owned()),
            field: vec![
                field("type_url", 1, Type::String, None),
                field("value", 2, Type::Message, Some(".google.protobuf.Struct")),
            ],
            ..Default::default()
        }],
        syntax: Some("proto3".to_owned()),
        ..Default::default()
    })
    .collect()
}

/// Drops the cached pool; it is decoded again on next use. Messages already decoded keep
/// what they reference alive until they are dropped.
pub fn release_pool() {
    if let Ok(mut slot) = POOL.lock() {
        *slot = None;
    }
}

/// The descriptor of a message by its full name (`envoy.config.bootstrap.v3.Bootstrap`).
pub fn descriptor(full_name: &str) -> Result<MessageDescriptor, ProtoError> {
    pool()?
        .get_message_by_name(full_name)
        .ok_or_else(|| ProtoError::UnknownType(full_name.to_owned()))
}

/// Decodes a JSON value (proto3 JSON mapping) into a dynamic message of the given type.
/// Unknown fields are errors, as in Envoy.
pub fn dynamic_from_json(
    full_name: &str,
    json: &serde_json::Value,
) -> Result<DynamicMessage, ProtoError> {
    let desc = descriptor(full_name)?;
    let mut track = serde_path_to_error::Track::new();
    let de = serde_path_to_error::Deserializer::new(json, &mut track);
    DynamicMessage::deserialize(desc, de).map_err(|e| {
        let path = track.path().to_string();
        if path.is_empty() || path == "." {
            ProtoError::Json(e.to_string())
        } else {
            ProtoError::Json(format!("{path}: {e}"))
        }
    })
}

/// Decodes protobuf bytes into a dynamic message of the given type.
pub fn dynamic_from_bytes(full_name: &str, bytes: &[u8]) -> Result<DynamicMessage, ProtoError> {
    let desc = descriptor(full_name)?;
    DynamicMessage::decode(desc, bytes).map_err(|e| ProtoError::Decode {
        type_name: full_name.to_owned(),
        reason: e.to_string(),
    })
}

/// Converts a dynamic message into the generated (typed) message.
pub fn to_typed<T: prost::Message + Default>(msg: &DynamicMessage) -> Result<T, ProtoError> {
    T::decode(prost::Message::encode_to_vec(msg).as_slice()).map_err(|e| ProtoError::Decode {
        type_name: msg.descriptor().full_name().to_owned(),
        reason: e.to_string(),
    })
}

/// Renders a dynamic message in the proto3 JSON mapping (snake_case field names as Envoy's
/// admin output uses them).
pub fn dynamic_to_json(msg: &DynamicMessage) -> Result<serde_json::Value, ProtoError> {
    let opts = prost_reflect::SerializeOptions::new()
        .use_proto_field_name(true)
        .stringify_64_bit_integers(true);
    msg.serialize_with_options(serde_json::value::Serializer, &opts)
        .map_err(|e| ProtoError::Json(e.to_string()))
}

/// Renders protobuf bytes of the named type as JSON.
pub fn bytes_to_json(full_name: &str, bytes: &[u8]) -> Result<serde_json::Value, ProtoError> {
    dynamic_to_json(&dynamic_from_bytes(full_name, bytes)?)
}

/// The message name of an `Any` type URL (`type.googleapis.com/a.b.C` → `a.b.C`).
pub fn type_name_of(type_url: &str) -> &str {
    type_url.rsplit('/').next().unwrap_or(type_url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_with_typed_config_round_trips() -> Result<(), ProtoError> {
        let json = serde_json::json!({
            "static_resources": {"listeners": [{"name": "l", "filter_chains": [{"filters": [{
                "name": "hcm",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "x", "stream_idle_timeout": "5s"
                }
            }]}]}]}
        });
        let msg = dynamic_from_json("envoy.config.bootstrap.v3.Bootstrap", &json)?;
        let typed: pb::envoy::config::bootstrap::v3::Bootstrap = to_typed(&msg)?;
        let listeners = typed
            .static_resources
            .map(|s| s.listeners)
            .unwrap_or_default();
        assert_eq!(listeners.len(), 1);
        assert_eq!(listeners[0].name, "l");
        Ok(())
    }

    #[test]
    fn unknown_field_is_rejected() {
        let json = serde_json::json!({"static_resources": {"bogus": 1}});
        let err = dynamic_from_json("envoy.config.bootstrap.v3.Bootstrap", &json);
        assert!(matches!(err, Err(ProtoError::Json(m)) if m.contains("bogus")));
    }

    #[test]
    fn typed_struct_decodes_from_json_and_bytes() -> Result<(), ProtoError> {
        let ts = serde_json::json!({
            "type_url": "type.googleapis.com/legate.example.AddHeader",
            "value": {"name": "x-hello", "value": "world"}
        });
        for ty in TYPED_STRUCT_TYPES {
            let msg = dynamic_from_json(ty, &ts)?;
            let typed: TypedStruct = to_typed(&msg)?;
            assert_eq!(
                typed.type_url,
                "type.googleapis.com/legate.example.AddHeader"
            );
            assert_eq!(typed.value.map(|v| v.fields.len()), Some(2));
        }
        Ok(())
    }
}
