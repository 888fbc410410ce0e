//! `Range` arithmetic: a served range always lies inside the blob.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        if data.len() < 8 {
            return;
        }
        let (len, value) = data.split_at(8);
        let mut b = [0u8; 8];
        b.copy_from_slice(len);
        let len = u64::from_le_bytes(b);
        let value = registry_fuzz::text(value);
        if let Some((s, e)) = registry_proxy::fuzz::range(&value, len) {
            assert!(s <= e && e < len, "{value:?} len {len}: {s}-{e}");
        }
    });
}
