//! `legate-hello`: Legate with its built-in filters plus the `AddHeader` filter of this crate.
//! It takes Envoy's command line, like `legate`.

fn main() -> std::process::ExitCode {
    let mut registry = legate_filters::FilterRegistry::with_builtins();
    legate_hello_filter::register(&mut registry);
    legate_proxy::main_with_registry(registry)
}
