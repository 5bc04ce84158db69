//! The `legate` binary: Envoy's command line, Legate's proxy, the built-in filters.

fn main() -> std::process::ExitCode {
    legate_proxy::main_with_registry(legate_filters::FilterRegistry::with_builtins())
}
