//! Preview URLs: a port of an environment at a host of its own, `<port>-<slug>.<domain>`
//! with the slug spelled as a host name allows (`8000-env-k2j4h5g6.preview.example.com`),
//! where an operator points a wildcard domain at Hearth (`HEARTH_PREVIEW_DOMAIN`, with
//! `HEARTH_PUBLIC_URL` saying where browsers reach Hearth itself). Each preview is an
//! origin of its own: the guest's app is served at `/` as anywhere else, and its pages
//! never share an origin with Hearth or with another preview.
//!
//! Signing a browser in: Hearth's session cookie is never sent to preview hosts (it is
//! host-only). A browser that has no preview cookie is sent to Hearth's own
//! `/v1/previews/sign-in`, where its session shows whose it is; if the environment is
//! theirs, it goes back to `/__hearth/preview` on the preview host with a code sealed
//! with the master key, bound to that host and good for `CODE_LIFETIME`. The preview host
//! turns the code into the cookie `hearth_preview`, for that host only, sealed too and
//! bound to the host and to the Hearth session: it ends when the session does, and at
//! `GRANT_LIFETIME` at most. Nothing is stored per grant, so any node can finish a
//! sign-in another began.

use crate::{App, AppError, AppResult};
use hearth_store::User;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How long the code between Hearth's origin and a preview host is good for.
pub const CODE_LIFETIME: Duration = Duration::from_secs(60);
/// How long a preview cookie is good for, at most (the session it stands on may end first).
pub const GRANT_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Preview cookies opened per request at most.
const MAX_PREVIEW_COOKIES: usize = 64;
/// The path on every preview host that Hearth keeps for itself (the guest never sees it).
pub const CALLBACK_PATH: &str = "/__hearth/preview";

/// Where previews live (`HEARTH_PREVIEW_DOMAIN`, `HEARTH_PUBLIC_URL`).
#[derive(Debug, Clone)]
pub struct PreviewConfig {
    /// `preview.example.com`: previews are at `<port>-<slug>.preview.example.com`.
    pub domain: String,
    /// `https://hearth.example.com`: Hearth's own origin, where browsers sign in.
    pub public_url: String,
}

impl PreviewConfig {
    pub fn from_env() -> Result<Option<PreviewConfig>, String> {
        let var = |n: &str| std::env::var(n).ok().filter(|v| !v.trim().is_empty());
        let Some(domain) = var("HEARTH_PREVIEW_DOMAIN") else {
            return Ok(None);
        };
        let public_url = var("HEARTH_PUBLIC_URL").ok_or(
            "HEARTH_PREVIEW_DOMAIN needs HEARTH_PUBLIC_URL, the address browsers reach Hearth at (https://hearth.example.com)",
        )?;
        PreviewConfig::new(&domain, &public_url).map(Some)
    }

    /// Checks both: a domain name (no scheme, port or wildcard) and an http(s) origin
    /// that is not itself under the preview domain.
    pub fn new(domain: &str, public_url: &str) -> Result<PreviewConfig, String> {
        let domain = domain.trim().trim_end_matches('.').to_ascii_lowercase();
        let labels_ok = domain.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
        if !labels_ok || !domain.contains('.') && domain != "localhost" {
            return Err(format!(
                "HEARTH_PREVIEW_DOMAIN must be a domain name such as preview.example.com (no scheme, port or *), not {domain:?}"
            ));
        }
        let public_url = public_url.trim().trim_end_matches('/').to_string();
        let host = public_url
            .strip_prefix("https://")
            .or_else(|| public_url.strip_prefix("http://"))
            .filter(|h| !h.is_empty() && !h.contains('/'))
            .ok_or_else(|| {
                format!(
                    "HEARTH_PUBLIC_URL must be an origin such as https://hearth.example.com, not {public_url:?}"
                )
            })?;
        reqwest::Url::parse(&public_url)
            .map_err(|e| format!("HEARTH_PUBLIC_URL {public_url:?}: {e}"))?;
        let name = host_name(host);
        if name == domain || name.ends_with(&format!(".{domain}")) {
            return Err(format!(
                "HEARTH_PUBLIC_URL ({public_url}) must not be under HEARTH_PREVIEW_DOMAIN ({domain}): guests' pages would share Hearth's origin"
            ));
        }
        if site(&name) == site(&domain) {
            return Err(format!(
                "HEARTH_PUBLIC_URL ({public_url}) and HEARTH_PREVIEW_DOMAIN ({domain}) must be on different sites (different last two labels, e.g. hearth.example.com and preview.example-apps.com): a guest's page could otherwise set cookies for Hearth's site and sign a visitor in as someone else"
            ));
        }
        Ok(PreviewConfig { domain, public_url })
    }

    /// `http` or `https`, as Hearth's own origin is reached.
    pub fn scheme(&self) -> &str {
        if self.public_url.starts_with("https://") {
            "https"
        } else {
            "http"
        }
    }

    /// The preview a `Host` header names, if it is one of ours.
    pub fn parse_host(&self, host: &str) -> Option<PreviewHost> {
        let name = host_name(host);
        let label = name.strip_suffix(&format!(".{}", self.domain))?;
        let (port, rest) = label.split_once("-env-")?;
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0 && !port.starts_with('0'))?;
        let slug_ok = !rest.is_empty()
            && rest.len() <= 32
            && rest
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        slug_ok.then(|| PreviewHost {
            host: host.to_ascii_lowercase(),
            port,
            slug: format!("env_{rest}"),
        })
    }

    /// Whether `host` is under the preview domain (a preview host or not).
    pub fn is_under(&self, host: &str) -> bool {
        let name = host_name(host);
        name == self.domain || name.ends_with(&format!(".{}", self.domain))
    }

    /// Where a browser without a preview cookie goes to sign in to `preview` (then to
    /// `path` on it).
    pub fn sign_in_url(&self, preview: &PreviewHost, path: &str) -> String {
        let mut url = reqwest::Url::parse(&format!("{}/v1/previews/sign-in", self.public_url))
            .expect("checked when configured");
        url.query_pairs_mut()
            .append_pair("host", &preview.host)
            .append_pair("path", local_path(path));
        url.into()
    }

    /// The preview URL of `port` of the environment with `slug`, on the port Hearth's own
    /// origin uses.
    pub fn url(&self, slug: &str, port: u16) -> String {
        let origin_port = self
            .public_url
            .rsplit_once(':')
            .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
            .map(|(_, p)| format!(":{p}"))
            .unwrap_or_default();
        format!(
            "{}://{port}-{}.{}{origin_port}/",
            self.scheme(),
            slug.replace('_', "-"),
            self.domain
        )
    }
}

/// A `Host` without its port and the root's trailing dot, lowercased.
fn host_name(host: &str) -> String {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// The site a host name belongs to, as cookies see it, approximated by its last two labels
/// (without the Public Suffix List this takes `example.co.uk`'s hosts for one site with
/// every other `.co.uk` name, which only refuses more than needed). An IP address is its
/// own site.
fn site(name: &str) -> String {
    if name.parse::<std::net::IpAddr>().is_ok() || name.starts_with('[') {
        return name.to_string();
    }
    let mut labels: Vec<&str> = name.rsplit('.').take(2).collect();
    labels.reverse();
    labels.join(".")
}

/// One preview host: `<port>-<slug>.<domain>`.
#[derive(Debug, Clone, PartialEq)]
pub struct PreviewHost {
    /// As browsers send it (with a port, when not the scheme's default), lowercased.
    pub host: String,
    pub port: u16,
    pub slug: String,
}

/// What a sealed code or cookie holds.
#[derive(Serialize, Deserialize)]
struct Grant {
    /// `code` or `cookie`: one is never taken for the other.
    purpose: String,
    host: String,
    session: String,
    expires_at: i64,
}

impl App {
    fn previews(&self) -> AppResult<&PreviewConfig> {
        self.config.previews.as_ref().ok_or_else(|| {
            AppError::Invalid(
                "preview URLs are not set up on this server (HEARTH_PREVIEW_DOMAIN); use /v1/environments/{id}/ports/{port}/".into(),
            )
        })
    }

    fn seal_grant(&self, purpose: &str, host: &str, session: &str, lifetime: Duration) -> String {
        let grant = Grant {
            purpose: purpose.into(),
            host: host.into(),
            session: session.into(),
            expires_at: self.now() + lifetime.as_millis() as i64,
        };
        hex::encode(
            self.master_key
                .seal(&serde_json::to_string(&grant).expect("serializable")),
        )
    }

    /// The session a sealed code or cookie stands on, if it is for `purpose` at `host`
    /// and has not expired.
    fn open_grant(&self, purpose: &str, host: &str, sealed: &str) -> Option<String> {
        let grant: Grant = hex::decode(sealed)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| self.master_key.open(&s).ok())
            .and_then(|s| serde_json::from_str(&s).ok())?;
        (grant.purpose == purpose && grant.host == host && grant.expires_at > self.now())
            .then_some(grant.session)
    }

    /// Step one, on Hearth's origin, for the holder of `session`: where to send the
    /// browser for preview host `host` (and then `path` on it).
    pub async fn preview_sign_in(
        &self,
        session: &str,
        host: &str,
        path: &str,
    ) -> AppResult<String> {
        let config = self.previews()?;
        let preview = config.parse_host(host).ok_or_else(|| {
            AppError::Invalid(format!(
                "host must be a preview host, <port>-<environment slug>.{}",
                config.domain
            ))
        })?;
        let (user, _) = self.session(session).await?;
        self.owned_environment(&user, &preview.slug).await?;
        let code = self.seal_grant("code", &preview.host, session, CODE_LIFETIME);
        let mut url = reqwest::Url::parse(&format!(
            "{}://{}{CALLBACK_PATH}",
            config.scheme(),
            preview.host
        ))
        .map_err(|e| AppError::Invalid(format!("host {host:?}: {e}")))?;
        url.query_pairs_mut()
            .append_pair("code", &code)
            .append_pair("path", local_path(path));
        Ok(url.into())
    }

    /// Step two, on the preview host: the cookie value a code turns into.
    pub async fn preview_grant(&self, preview: &PreviewHost, code: &str) -> AppResult<String> {
        let session = self
            .open_grant("code", &preview.host, code)
            .ok_or_else(|| {
                AppError::Unauthenticated(
                    "this preview sign-in link is for another host or older than a minute; open the preview again".into(),
                )
            })?;
        self.session(&session).await?;
        Ok(self.seal_grant("cookie", &preview.host, &session, GRANT_LIFETIME))
    }

    /// Who the request's preview cookies sign in at `preview`, if one holds. Each is
    /// opened (no database needed), since a sibling preview's page may have set junk ones
    /// for the whole preview domain; only the first sealed for this host has its session
    /// looked up.
    pub async fn preview_user<'a>(
        &self,
        preview: &PreviewHost,
        cookies: impl IntoIterator<Item = &'a str>,
    ) -> Option<User> {
        let session = cookies
            .into_iter()
            .take(MAX_PREVIEW_COOKIES)
            .find_map(|c| self.open_grant("cookie", &preview.host, c))?;
        self.session(&session).await.ok().map(|(user, _)| user)
    }
}

/// A path on the same host: `/` unless `path` is one. Only visible ASCII passes (browsers
/// drop tabs and line breaks from a `Location`, which would turn `/<tab>/evil.com` into
/// `//evil.com`), and never `//` at its start or a backslash.
pub fn local_path(path: &str) -> &str {
    if path.bytes().all(|b| b.is_ascii_graphic())
        && path.starts_with('/')
        && !path.starts_with("//")
        && !path.contains('\\')
        && path.len() <= 4096
    {
        path
    } else {
        "/"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> PreviewConfig {
        PreviewConfig::new("Preview.Example.com", "https://hearth.example.org/").unwrap()
    }

    #[test]
    fn a_preview_host_names_a_port_and_a_slug() {
        let c = config();
        assert_eq!(c.public_url, "https://hearth.example.org");
        assert_eq!(
            c.parse_host("3000-env-k2j4h5g6.preview.example.com"),
            Some(PreviewHost {
                host: "3000-env-k2j4h5g6.preview.example.com".into(),
                port: 3000,
                slug: "env_k2j4h5g6".into()
            })
        );
        assert_eq!(
            c.url("env_k2j4h5g6", 3000),
            "https://3000-env-k2j4h5g6.preview.example.com/"
        );
        let with_port = c
            .parse_host("8000-ENV-A1.PREVIEW.example.com:8443")
            .unwrap();
        assert_eq!(
            (
                with_port.host.as_str(),
                with_port.port,
                with_port.slug.as_str()
            ),
            ("8000-env-a1.preview.example.com:8443", 8000, "env_a1")
        );
        let dotted = c
            .parse_host("3000-env-k2j4h5g6.preview.example.com.")
            .unwrap();
        assert_eq!(dotted.slug, "env_k2j4h5g6");
        assert!(c.is_under("www.preview.example.com."));
        let local = PreviewConfig::new("preview.localhost", "http://127.0.0.1:8080").unwrap();
        assert_eq!(
            local.url("env_a1", 5173),
            "http://5173-env-a1.preview.localhost:8080/"
        );
        for not_ours in [
            "hearth.example.com",
            "preview.example.com",
            "3000-x.other.example.com",
            "3000-x.preview.example.com",
            "0-env-x.preview.example.com",
            "03000-env-x.preview.example.com",
            "70000-env-x.preview.example.com",
            "3000-env-.preview.example.com",
            "env-x-3000.preview.example.com",
            "3000-env-a_b.preview.example.com",
            "3000-env-a-b.preview.example.com",
            "3000-env-x.y.preview.example.com",
            "3000-env-x.preview.example.com.evil.com",
        ] {
            assert_eq!(c.parse_host(not_ours), None, "{not_ours}");
        }
    }

    #[test]
    fn the_settings_are_checked() {
        for bad in [
            "*.preview.example.com",
            "https://preview.example.com",
            "a..b",
            "com",
        ] {
            assert!(
                PreviewConfig::new(bad, "https://h.example.com").is_err(),
                "{bad}"
            );
        }
        assert!(PreviewConfig::new("p.example.com", "hearth.example.com").is_err());
        assert!(PreviewConfig::new("p.example.com", "https://h.example.com/ui").is_err());
        assert!(
            PreviewConfig::new("example.com", "https://hearth.example.com").is_err(),
            "Hearth under the preview domain"
        );
        assert!(PreviewConfig::new("preview.localhost", "http://127.0.0.1:8080").is_ok());
        for same_site in [
            ("preview.example.com", "https://hearth.example.com"),
            ("preview.example.com", "https://example.com."),
            ("preview.example.co.uk", "https://hearth.example.co.uk:8443"),
        ] {
            assert!(
                PreviewConfig::new(same_site.0, same_site.1).is_err(),
                "{same_site:?}"
            );
        }
        assert!(
            PreviewConfig::new("preview.example-apps.com", "https://hearth.example.com").is_ok()
        );
    }

    #[test]
    fn a_redirect_stays_on_its_host() {
        assert_eq!(local_path("/a/b?c=1"), "/a/b?c=1");
        for bad in [
            "//evil.com/",
            "https://evil.com/",
            "/\\evil.com",
            "/\t/evil.com",
            "/\n/evil.com",
            "/ /x",
            "/\u{e9}",
            "",
            "a",
        ] {
            assert_eq!(local_path(bad), "/", "{bad}");
        }
    }
}
