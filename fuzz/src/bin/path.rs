//! `/v2/` path grammar: names, tags, digests, route shapes.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        let s = registry_fuzz::text(data);
        if let Some(name) = registry_proxy::fuzz::route_name(&s) {
            // A parsed name is valid by the same rules the config uses.
            assert!(registry_proxy::fuzz::valid_name(&name), "{name:?}");
        }
        let _ = registry_proxy::fuzz::valid_digest(&s);
        let _ = registry_proxy::fuzz::valid_tag(&s);
    });
}
