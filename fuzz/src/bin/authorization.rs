//! Client `Authorization` header values (Basic and Bearer).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        let _ = registry_auth::client::parse_authorization(data);
    });
}
