//! `ModuleConfig/deckhouse` → `spec.settings.registry`, validated like the module's OpenAPI schema
//! and CEL rules, plus the stricter rule that Direct needs an `imagesRepo` with a path.

use serde::{Deserialize, Serialize};

use crate::consts::{CE_IMAGES_REPO, LICENSE_USERNAME};

/// Registry access mode (`spec.settings.registry.mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Mode {
    /// Nodes and components talk to the upstream directly; no proxy.
    #[default]
    Unmanaged,
    /// Nodes rewrite `system/deckhouse`; components use the in-cluster proxy.
    Direct,
    /// Accepted by the schema, not implemented by this controller.
    Proxy,
    /// Accepted by the schema, not implemented by this controller.
    Local,
}

impl Mode {
    /// The schema spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Unmanaged => "Unmanaged",
            Mode::Direct => "Direct",
            Mode::Proxy => "Proxy",
            Mode::Local => "Local",
        }
    }

    /// Parses the schema spelling; anything else is `None`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "Unmanaged" => Some(Mode::Unmanaged),
            "Direct" => Some(Mode::Direct),
            "Proxy" => Some(Mode::Proxy),
            "Local" => Some(Mode::Local),
            _ => None,
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Upstream scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Scheme {
    /// Plain HTTP (nodes get `skip_verify`).
    #[serde(rename = "HTTP")]
    Http,
    /// HTTPS.
    #[default]
    #[serde(rename = "HTTPS")]
    Https,
}

impl Scheme {
    /// `HTTP` / `HTTPS` as in the schema.
    pub fn as_upper(self) -> &'static str {
        match self {
            Scheme::Http => "HTTP",
            Scheme::Https => "HTTPS",
        }
    }
    /// `http` / `https` as in URLs.
    pub fn as_lower(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// Checker scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum CheckMode {
    /// Every deckhouse container image.
    #[default]
    Default,
    /// Only the deckhouse image tag.
    Relax,
}

impl CheckMode {
    /// Schema spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckMode::Default => "Default",
            CheckMode::Relax => "Relax",
        }
    }
}

/// Validated upstream parameters (the `direct` or `unmanaged` object).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamParams {
    /// `host[:port]` of the upstream.
    pub host: String,
    /// Repository path without leading or trailing `/` (may be empty only outside Direct).
    pub path: String,
    /// Upstream scheme.
    pub scheme: Scheme,
    /// Upstream user (`license-token` when a license was given).
    pub username: Option<String>,
    /// Upstream password or license key.
    pub password: Option<String>,
    /// PEM of the upstream root CA (HTTPS only).
    pub ca: Option<String>,
    /// Checker scope.
    pub check_mode: CheckMode,
}

impl UpstreamParams {
    /// `host[/path]` as written in `imagesRepo` (trailing `/` trimmed).
    pub fn images_repo(&self) -> String {
        if self.path.is_empty() {
            self.host.clone()
        } else {
            format!("{}/{}", self.host, self.path)
        }
    }

    /// `<scheme>://<host>`.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme.as_lower(), self.host)
    }

    /// `(user, password)` when the upstream needs credentials.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        match (&self.username, &self.password) {
            (Some(u), Some(p)) => Some((u.as_str(), p.as_str())),
            _ => None,
        }
    }
}

/// What `spec.settings.registry` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Unmanaged; `None` is the non-configurable variant (no `imagesRepo`).
    Unmanaged(Option<UpstreamParams>),
    /// Direct with its upstream.
    Direct(UpstreamParams),
    /// Proxy mode (unsupported here).
    Proxy,
    /// Local mode (unsupported here).
    Local,
}

impl Target {
    /// The mode of this target.
    pub fn mode(&self) -> Mode {
        match self {
            Target::Unmanaged(_) => Mode::Unmanaged,
            Target::Direct(_) => Mode::Direct,
            Target::Proxy => Mode::Proxy,
            Target::Local => Mode::Local,
        }
    }
    /// Upstream parameters when configured.
    pub fn params(&self) -> Option<&UpstreamParams> {
        match self {
            Target::Unmanaged(p) => p.as_ref(),
            Target::Direct(p) => Some(p),
            Target::Proxy | Target::Local => None,
        }
    }
}

/// A validation failure; `Display` names the offending field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConfigError {
    /// Dotted path below `spec.settings.registry`.
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

fn err(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: format!("spec.settings.registry{field}"),
        reason: reason.into(),
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawParams {
    images_repo: Option<String>,
    license: Option<String>,
    username: Option<String>,
    password: Option<String>,
    scheme: Option<String>,
    ca: Option<String>,
    check_mode: Option<String>,
    ttl: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    mode: Option<String>,
    direct: Option<serde_json::Value>,
    unmanaged: Option<serde_json::Value>,
    proxy: Option<serde_json::Value>,
}

/// The pattern of `imagesRepo`: `^[0-9a-zA-Z\.\-]+(\:[0-9]{1,5})?(\/[0-9a-zA-Z\.\-\_]+)*$`.
pub fn images_repo_matches(repo: &str) -> bool {
    let host_char = |c: char| c.is_ascii_alphanumeric() || c == '.' || c == '-';
    let path_char = |c: char| host_char(c) || c == '_';
    let (authority, path) = match repo.find('/') {
        Some(i) => (&repo[..i], Some(&repo[i + 1..])),
        None => (repo, None),
    };
    let (host, port) = match authority.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (authority, None),
    };
    if host.is_empty() || !host.chars().all(host_char) {
        return false;
    }
    if let Some(p) = port
        && (p.is_empty() || p.len() > 5 || !p.chars().all(|c| c.is_ascii_digit()))
    {
        return false;
    }
    match path {
        None => true,
        Some(p) => p
            .split('/')
            .all(|seg| !seg.is_empty() && seg.chars().all(path_char)),
    }
}

fn parse_params(
    value: &serde_json::Value,
    section: &str,
    require_path: bool,
    allow_ttl: bool,
) -> Result<Option<UpstreamParams>, ConfigError> {
    let field = format!(".{section}");
    let raw: RawParams =
        serde_json::from_value(value.clone()).map_err(|e| err(&field, e.to_string()))?;
    if raw.ttl.is_some() && !allow_ttl {
        return Err(err(&format!("{field}.ttl"), "allowed only in proxy"));
    }
    let images_repo = match (raw.images_repo, section) {
        (Some(r), _) => Some(r),
        // The schema default applies to `direct` only; `unmanaged` without it is non-configurable.
        (None, "direct") => Some(CE_IMAGES_REPO.to_string()),
        (None, _) => None,
    };
    let Some(images_repo) = images_repo else {
        if raw.license.is_some()
            || raw.username.is_some()
            || raw.password.is_some()
            || raw.ca.is_some()
            || raw.scheme.is_some()
        {
            return Err(err(
                &format!("{field}.imagesRepo"),
                "required when any other upstream field is set",
            ));
        }
        return Ok(None);
    };
    let f_repo = format!("{field}.imagesRepo");
    if images_repo.is_empty() {
        return Err(err(&f_repo, "must not be empty"));
    }
    let trimmed = images_repo.trim_end_matches('/');
    if !images_repo_matches(trimmed) {
        return Err(err(
            &f_repo,
            format!(
                "{images_repo:?} does not match ^[0-9a-zA-Z\\.\\-]+(\\:[0-9]{{1,5}})?(\\/[0-9a-zA-Z\\.\\-\\_]+)*$"
            ),
        ));
    }
    let (host, path) = match trimmed.split_once('/') {
        Some((h, p)) => (h.to_string(), p.to_string()),
        None => (trimmed.to_string(), String::new()),
    };
    if require_path && path.is_empty() {
        return Err(err(
            &f_repo,
            format!(
                "{images_repo:?} has no repository path; Direct maps system/deckhouse onto that path (e.g. {CE_IMAGES_REPO})"
            ),
        ));
    }
    let scheme = match raw.scheme.as_deref() {
        None | Some("HTTPS") => Scheme::Https,
        Some("HTTP") => Scheme::Http,
        Some(other) => {
            return Err(err(
                &format!("{field}.scheme"),
                format!("{other:?} is not one of HTTP, HTTPS"),
            ));
        }
    };
    let check_mode = match raw.check_mode.as_deref() {
        None | Some("Default") => CheckMode::Default,
        Some("Relax") => CheckMode::Relax,
        Some(other) => {
            return Err(err(
                &format!("{field}.checkMode"),
                format!("{other:?} is not one of Default, Relax"),
            ));
        }
    };
    let nonempty = |v: Option<String>| v.filter(|s| !s.is_empty());
    let (license, username, password) = (
        nonempty(raw.license),
        nonempty(raw.username),
        nonempty(raw.password),
    );
    let (username, password) = match (license, username, password) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            return Err(err(
                &format!("{field}.license"),
                "license and username/password are mutually exclusive",
            ));
        }
        (Some(l), None, None) => (Some(LICENSE_USERNAME.to_string()), Some(l)),
        (None, Some(u), Some(p)) => (Some(u), Some(p)),
        (None, Some(_), None) => {
            return Err(err(&format!("{field}.password"), "required with username"));
        }
        (None, None, Some(_)) => {
            return Err(err(&format!("{field}.username"), "required with password"));
        }
        (None, None, None) => (None, None),
    };
    let ca = nonempty(raw.ca);
    if let Some(pem) = &ca {
        if scheme == Scheme::Http {
            return Err(err(&format!("{field}.ca"), "not allowed with scheme HTTP"));
        }
        validate_pem(pem).map_err(|r| err(&format!("{field}.ca"), r))?;
    }
    Ok(Some(UpstreamParams {
        host,
        path,
        scheme,
        username,
        password,
        ca,
        check_mode,
    }))
}

fn validate_pem(pem: &str) -> Result<(), String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut count = 0usize;
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        cert.map_err(|e| format!("not a PEM certificate: {e:?}"))?;
        count += 1;
    }
    if count == 0 {
        return Err("contains no PEM certificate".into());
    }
    Ok(())
}

/// Validates `spec.settings.registry` (the JSON value of that key; `None` when absent).
pub fn parse_registry_settings(value: Option<&serde_json::Value>) -> Result<Target, ConfigError> {
    let raw: RawRegistry = match value {
        None | Some(serde_json::Value::Null) => RawRegistry::default(),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| err("", e.to_string()))?,
    };
    let mode = match raw.mode.as_deref() {
        None => Mode::Unmanaged,
        Some(m) => Mode::parse(m).ok_or_else(|| {
            err(
                ".mode",
                format!("{m:?} is not one of Unmanaged, Direct, Proxy, Local"),
            )
        })?,
    };
    let forbid = |present: bool, name: &str| -> Result<(), ConfigError> {
        if present {
            Err(err(
                &format!(".{name}"),
                format!("not allowed with mode {mode}"),
            ))
        } else {
            Ok(())
        }
    };
    match mode {
        Mode::Direct => {
            forbid(raw.unmanaged.is_some(), "unmanaged")?;
            forbid(raw.proxy.is_some(), "proxy")?;
            let direct = raw
                .direct
                .ok_or_else(|| err(".direct", "required with mode Direct"))?;
            let params = parse_params(&direct, "direct", true, false)?
                .ok_or_else(|| err(".direct.imagesRepo", "required"))?;
            Ok(Target::Direct(params))
        }
        Mode::Unmanaged => {
            forbid(raw.direct.is_some(), "direct")?;
            forbid(raw.proxy.is_some(), "proxy")?;
            let params = match raw.unmanaged {
                Some(v) => parse_params(&v, "unmanaged", false, false)?,
                None => None,
            };
            Ok(Target::Unmanaged(params))
        }
        Mode::Proxy => {
            forbid(raw.direct.is_some(), "direct")?;
            forbid(raw.unmanaged.is_some(), "unmanaged")?;
            Ok(Target::Proxy)
        }
        Mode::Local => {
            forbid(raw.direct.is_some(), "direct")?;
            forbid(raw.unmanaged.is_some(), "unmanaged")?;
            forbid(raw.proxy.is_some(), "proxy")?;
            Ok(Target::Local)
        }
    }
}

/// A parsed `ModuleConfig/deckhouse`.
#[derive(Clone, Debug)]
pub struct ModuleConfig {
    /// `metadata.generation` (the conditions' `observedGeneration`).
    pub generation: i64,
    /// The validated target, or why it is invalid.
    pub target: Result<Target, ConfigError>,
}

/// Reads a `ModuleConfig` object (as JSON) and validates its registry settings.
pub fn parse_module_config(obj: &serde_json::Value) -> Result<ModuleConfig, ConfigError> {
    let kind = obj.get("kind").and_then(|v| v.as_str()).unwrap_or("");
    let name = obj
        .pointer("/metadata/name")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    if kind != "ModuleConfig" || name != "deckhouse" {
        return Err(ConfigError {
            field: "ModuleConfig".into(),
            reason: format!("expected ModuleConfig/deckhouse, got {kind}/{name}"),
        });
    }
    let generation = obj
        .pointer("/metadata/generation")
        .and_then(|v| v.as_i64())
        .unwrap_or(0);
    Ok(ModuleConfig {
        generation,
        target: parse_registry_settings(obj.pointer("/spec/settings/registry")),
    })
}

#[cfg(test)]
mod tests;
