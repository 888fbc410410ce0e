//! Upstream `WWW-Authenticate` challenges.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        let _ = registry_auth::upstream::parse_challenge(&registry_fuzz::text(data));
    });
}
