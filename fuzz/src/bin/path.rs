//! `/v2/` path grammar: names, tags, digests, route shapes.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        let s = registry_fuzz::text(data);
        if let Ok(route) = registry_proxy::path::parse(&s) {
            // A parsed name is valid by the same rules the config uses.
            if let Some(name) = route.name() {
                assert!(registry_proxy::path::valid_name(name), "{name:?}");
            }
        }
        let _ = registry_proxy::path::parse_digest(&s);
        let _ = registry_proxy::path::valid_tag(&s);
    });
}
