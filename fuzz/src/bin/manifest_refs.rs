//! Manifest reference extraction (config, layers, index children, subject) from upstream
//! bytes. Oracle besides "no panic, no hang": every digest takes at least 71 bytes of input
//! (`sha256:` and 64 hex digits; JSON escapes only make it longer), so the counts are
//! bounded by the input's length.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        let r = registry_oci::references(data);
        let n = r.blobs.len() + r.children.len() + usize::from(r.subject.is_some());
        assert!(n * 71 <= data.len(), "{n} references from {} bytes", data.len());
    });
}
