//! `/v2/` path grammar: names, tags, digests, route shapes. Oracles besides "no panic,
//! no hang": a name the router extracts is valid by the grammar the config uses, a name the
//! grammar accepts routes as itself, a tag parses as a tag, and an accepted digest prints
//! back exactly as it was read (it becomes a file name and a header value).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        let s = registry_fuzz::text(data);
        if let Some(name) = registry_proxy::fuzz::route_name(&s) {
            assert!(registry_oci::is_valid_name(&name), "{name:?}");
        }
        if registry_oci::is_valid_name(&s) {
            let routed = registry_proxy::fuzz::route_name(&format!("{s}/tags/list"));
            assert_eq!(routed.as_deref(), Some(&*s));
        }
        if let Ok(d) = registry_oci::parse_digest(&s) {
            assert_eq!(d.to_string(), s);
            assert!(!d.digest().contains('/'), "{s:?}");
        }
        if registry_oci::is_valid_tag(&s) {
            assert_eq!(
                registry_oci::Reference::parse(&s),
                Ok(registry_oci::Reference::Tag(s.to_string()))
            );
        }
    });
}
