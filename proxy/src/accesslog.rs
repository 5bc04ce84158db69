//! Access logs: Envoy's substitution format strings (text and `json_format`) written to files
//! by a background task, so a request never waits on disk.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderMap;
use tokio::sync::mpsc;

/// Envoy's default access log format.
pub const DEFAULT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\"\n";

/// Errors in a format string.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("unsupported format operator %{0}%")]
    Unknown(String),
    #[error("unterminated format operator in {0:?}")]
    Unterminated(String),
}

/// One piece of a format string.
#[derive(Debug, Clone)]
enum Token {
    Literal(String),
    StartTime,
    Req {
        name: String,
        alt: Option<String>,
        max: Option<usize>,
    },
    Resp {
        name: String,
        alt: Option<String>,
        max: Option<usize>,
    },
    Protocol,
    ResponseCode,
    ResponseCodeDetails,
    ResponseFlags,
    BytesReceived,
    BytesSent,
    Duration,
    UpstreamHost,
    UpstreamCluster,
    DownstreamRemoteAddress,
    DownstreamRemoteAddressWithoutPort,
    DownstreamLocalAddress,
    RequestedServerName,
    RouteName,
    Hostname,
}

/// A parsed format string.
#[derive(Debug, Clone)]
pub struct Format(Vec<Token>);

/// How a log line is built.
#[derive(Debug, Clone)]
pub enum LogFormat {
    Text(Format),
    Json(Vec<(String, Format)>),
}

/// What a finished request leaves for its access log.
#[derive(Debug, Default)]
pub struct Record {
    pub start: Option<SystemTime>,
    pub request_headers: HeaderMap,
    pub method: String,
    pub path: String,
    pub authority: String,
    pub protocol: &'static str,
    pub response_headers: HeaderMap,
    pub response_code: u16,
    pub response_code_details: &'static str,
    pub response_flags: &'static str,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration: Duration,
    pub upstream_host: Option<SocketAddr>,
    pub upstream_cluster: Option<String>,
    pub downstream_remote: Option<SocketAddr>,
    pub downstream_local: Option<SocketAddr>,
    pub requested_server_name: Option<String>,
    pub route_name: Option<String>,
}

fn header_arg(arg: &str) -> (String, Option<String>) {
    match arg.split_once('?') {
        Some((a, b)) => (a.to_ascii_lowercase(), Some(b.to_ascii_lowercase())),
        None => (arg.to_ascii_lowercase(), None),
    }
}

impl Format {
    /// Parses an Envoy format string.
    pub fn parse(s: &str) -> Result<Self, FormatError> {
        let mut tokens = Vec::new();
        let mut lit = String::new();
        let mut rest = s;
        while let Some(i) = rest.find('%') {
            lit.push_str(&rest[..i]);
            let after = &rest[i + 1..];
            if let Some(stripped) = after.strip_prefix('%') {
                lit.push('%');
                rest = stripped;
                continue;
            }
            let end = after
                .find('%')
                .ok_or_else(|| FormatError::Unterminated(s.to_owned()))?;
            let op = &after[..end];
            if !lit.is_empty() {
                tokens.push(Token::Literal(std::mem::take(&mut lit)));
            }
            tokens.push(parse_op(op)?);
            rest = &after[end + 1..];
        }
        lit.push_str(rest);
        if !lit.is_empty() {
            tokens.push(Token::Literal(lit));
        }
        Ok(Format(tokens))
    }

    fn single(&self) -> Option<&Token> {
        match self.0.as_slice() {
            [t] => Some(t),
            _ => None,
        }
    }

    fn render_into(&self, r: &Record, out: &mut String) {
        for t in &self.0 {
            match value(t, r) {
                Some(v) => out.push_str(&v),
                None => out.push('-'),
            }
        }
    }
}

fn parse_op(op: &str) -> Result<Token, FormatError> {
    let (name, arg, max) = match op.find('(') {
        Some(i) => {
            let close = op.rfind(')').unwrap_or(op.len());
            let arg = &op[i + 1..close];
            let max = op[close..].strip_prefix("):").and_then(|m| m.parse().ok());
            (&op[..i], Some(arg), max)
        }
        None => (op, None, None),
    };
    Ok(match (name, arg) {
        ("START_TIME", _) => Token::StartTime,
        ("REQ", Some(a)) => {
            let (name, alt) = header_arg(a);
            Token::Req { name, alt, max }
        }
        ("RESP", Some(a)) => {
            let (name, alt) = header_arg(a);
            Token::Resp { name, alt, max }
        }
        ("PROTOCOL", None) => Token::Protocol,
        ("RESPONSE_CODE", None) => Token::ResponseCode,
        ("RESPONSE_CODE_DETAILS", None) => Token::ResponseCodeDetails,
        ("RESPONSE_FLAGS", None) => Token::ResponseFlags,
        ("BYTES_RECEIVED", None) => Token::BytesReceived,
        ("BYTES_SENT", None) => Token::BytesSent,
        ("DURATION", None) => Token::Duration,
        ("UPSTREAM_HOST", None) => Token::UpstreamHost,
        ("UPSTREAM_CLUSTER", None) => Token::UpstreamCluster,
        ("DOWNSTREAM_REMOTE_ADDRESS", None) => Token::DownstreamRemoteAddress,
        ("DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT", None) => {
            Token::DownstreamRemoteAddressWithoutPort
        }
        ("DOWNSTREAM_LOCAL_ADDRESS", None) => Token::DownstreamLocalAddress,
        ("REQUESTED_SERVER_NAME", None) => Token::RequestedServerName,
        ("ROUTE_NAME", None) => Token::RouteName,
        ("HOSTNAME", None) => Token::Hostname,
        _ => return Err(FormatError::Unknown(op.to_owned())),
    })
}

fn header(map: &HeaderMap, name: &str, alt: Option<&str>, r: &Record) -> Option<String> {
    let get = |n: &str| -> Option<String> {
        match n {
            ":method" => Some(r.method.clone()),
            ":path" => Some(r.path.clone()),
            ":authority" => Some(r.authority.clone()).filter(|a| !a.is_empty()),
            _ => map
                .get(n)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
        }
    };
    get(name).or_else(|| alt.and_then(get))
}

fn truncate(s: String, max: Option<usize>) -> String {
    match max {
        Some(m) if s.len() > m => s.chars().take(m).collect(),
        _ => s,
    }
}

fn value(t: &Token, r: &Record) -> Option<String> {
    match t {
        Token::Literal(s) => Some(s.clone()),
        Token::StartTime => r.start.map(format_time),
        Token::Req { name, alt, max } => {
            header(&r.request_headers, name, alt.as_deref(), r).map(|v| truncate(v, *max))
        }
        Token::Resp { name, alt, max } => {
            header(&r.response_headers, name, alt.as_deref(), r).map(|v| truncate(v, *max))
        }
        Token::Protocol => Some(r.protocol.to_owned()),
        Token::ResponseCode => Some(r.response_code.to_string()),
        Token::ResponseCodeDetails => Some(r.response_code_details.to_owned()),
        Token::ResponseFlags => Some(r.response_flags.to_owned()).filter(|f| !f.is_empty()),
        Token::BytesReceived => Some(r.bytes_received.to_string()),
        Token::BytesSent => Some(r.bytes_sent.to_string()),
        Token::Duration => Some(r.duration.as_millis().to_string()),
        Token::UpstreamHost => r.upstream_host.map(|a| a.to_string()),
        Token::UpstreamCluster => r.upstream_cluster.clone(),
        Token::DownstreamRemoteAddress => r.downstream_remote.map(|a| a.to_string()),
        Token::DownstreamRemoteAddressWithoutPort => {
            r.downstream_remote.map(|a| a.ip().to_string())
        }
        Token::DownstreamLocalAddress => r.downstream_local.map(|a| a.to_string()),
        Token::RequestedServerName => r.requested_server_name.clone(),
        Token::RouteName => r.route_name.clone(),
        Token::Hostname => hostname(),
    }
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ`, Envoy's default `%START_TIME%`.
pub fn format_time(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60,
        d.subsec_millis()
    )
}

impl LogFormat {
    /// Renders one log line (with its trailing newline for JSON).
    pub fn render(&self, r: &Record) -> String {
        match self {
            LogFormat::Text(f) => {
                let mut s = String::new();
                f.render_into(r, &mut s);
                s
            }
            LogFormat::Json(fields) => {
                let mut map = serde_json::Map::new();
                for (k, f) in fields {
                    let v = match f.single() {
                        Some(
                            t @ (Token::ResponseCode
                            | Token::BytesReceived
                            | Token::BytesSent
                            | Token::Duration),
                        ) => value(t, r)
                            .and_then(|v| v.parse::<u64>().ok())
                            .map_or(serde_json::Value::Null, serde_json::Value::from),
                        Some(t) => {
                            value(t, r).map_or(serde_json::Value::Null, serde_json::Value::from)
                        }
                        None => {
                            let mut s = String::new();
                            f.render_into(r, &mut s);
                            serde_json::Value::from(s)
                        }
                    };
                    map.insert(k.clone(), v);
                }
                let mut s = serde_json::Value::Object(map).to_string();
                let _ = writeln!(s);
                s
            }
        }
    }
}

/// A configured access log: a format and the writer of its file.
#[derive(Debug, Clone)]
pub struct AccessLog {
    pub path: String,
    pub format: LogFormat,
    tx: mpsc::UnboundedSender<String>,
}

impl AccessLog {
    /// Opens (appends to) `path` and starts its writer task.
    pub fn open(path: &str, format: LogFormat) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let mut w = std::io::BufWriter::new(file);
                while let Some(line) = rx.blocking_recv() {
                    let _ = w.write_all(line.as_bytes());
                    while let Ok(more) = rx.try_recv() {
                        let _ = w.write_all(more.as_bytes());
                    }
                    let _ = w.flush();
                }
            })?;
        Ok(Self {
            path: path.to_owned(),
            format,
            tx,
        })
    }

    /// Queues one record.
    pub fn log(&self, r: &Record) {
        let _ = self.tx.send(self.format.render(r));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_format_renders_like_envoy() -> Result<(), FormatError> {
        let f = LogFormat::Text(Format::parse(DEFAULT_FORMAT)?);
        let mut r = Record {
            method: "GET".into(),
            path: "/x".into(),
            authority: "h".into(),
            protocol: "HTTP/1.1",
            response_code: 200,
            bytes_sent: 5,
            start: Some(UNIX_EPOCH + Duration::from_millis(86_400_123)),
            ..Default::default()
        };
        r.request_headers
            .insert("user-agent", http::HeaderValue::from_static("curl"));
        let line = f.render(&r);
        assert_eq!(
            line,
            "[1970-01-02T00:00:00.123Z] \"GET /x HTTP/1.1\" 200 - 0 5 0 - \"-\" \"curl\" \"-\" \"h\" \"-\"\n"
        );
        Ok(())
    }

    #[test]
    fn unknown_operator_is_rejected() {
        assert!(matches!(
            Format::parse("%NOPE%"),
            Err(FormatError::Unknown(_))
        ));
    }
}
