//! Client `GET /auth/token?service=..&scope=..` queries.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        let _ = registry_auth::client::TokenRequest::from_query(&registry_fuzz::text(data));
    });
}
