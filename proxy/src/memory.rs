//! Memory that only configuration needs.

/// Drops Envoy's descriptors (decoded again when configuration is next read) and hands the
/// freed memory back to the system: glibc keeps freed heap memory that is not at the top of
/// the heap; `malloc_trim` releases it. Called once the bootstrap is converted, and by the
/// xDS client when updates have been quiet for a while.
pub fn release_config_memory() {
    legate_proto::release_pool();
    trim();
}

#[allow(unsafe_code)]
fn trim() {
    // SAFETY: malloc_trim only walks glibc's own heap structures; it takes no pointers from us.
    unsafe {
        libc::malloc_trim(0);
    }
}
