//! Manifest reference extraction (config, layers, index children) from upstream bytes.
//! Oracle besides "no panic, no hang": every digest takes at least 71 bytes of input
//! (`sha256:` and 64 hex digits; JSON escapes only make it longer), so the counts are
//! bounded by the input's length.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        let (blobs, children) = registry_proxy::fuzz::manifest_references(data);
        assert!(
            (blobs + children) * 71 <= data.len(),
            "{blobs} + {children} references from {} bytes",
            data.len()
        );
    });
}
