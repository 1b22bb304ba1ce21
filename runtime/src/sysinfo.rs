//! Process facts for reports: peak and current resident memory.

fn status_kb(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Peak resident set size in bytes (Linux `VmHWM`), or `None` where unavailable.
pub fn peak_rss_bytes() -> Option<u64> {
    status_kb("VmHWM:")
}

/// Resident bytes now, split into anonymous memory (heap, KV cache, expert slots) and file pages
/// (the model file's mapped weights): `(RssAnon, RssFile)`.
pub fn rss_split_bytes() -> Option<(u64, u64)> {
    Some((status_kb("RssAnon:")?, status_kb("RssFile:")?))
}
