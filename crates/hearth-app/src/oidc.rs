//! Signing in with an OpenID provider (GitHub through its OIDC-compatible settings, Google,
//! Keycloak, ...): discovery, the authorization code flow with PKCE, and the state and nonce
//! checked. The user is matched by a verified email, or made with `HEARTH_OIDC_TIER`.
//!
//! Configured by `HEARTH_OIDC_ISSUER`, `HEARTH_OIDC_CLIENT_ID`, `HEARTH_OIDC_CLIENT_SECRET`,
//! `HEARTH_OIDC_REDIRECT_URL` (this server's `/v1/auth/oidc/callback` as browsers reach it),
//! and optionally `HEARTH_OIDC_TIER` (default `free`) and `HEARTH_OIDC_NAME` (the button's
//! label). Between the redirect out and the one back, the state, nonce and PKCE verifier
//! travel in a cookie sealed with the master key, valid `FLOW_LIFETIME`: any node can
//! finish a flow another began, and nothing is stored per attempt.

use crate::{App, AppError, AppResult};
use hearth_core::{Role, Tier};
use hearth_store::{NewSession, User};
use openidconnect::core::{CoreAuthenticationFlow, CoreClient, CoreProviderMetadata};
use openidconnect::{
    AuthorizationCode, ClientId, ClientSecret, CsrfToken, EndpointMaybeSet, EndpointNotSet,
    EndpointSet, IssuerUrl, Nonce, OAuth2TokenResponse, PkceCodeChallenge, PkceCodeVerifier,
    RedirectUrl, Scope, TokenResponse,
};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How long a browser may take at the provider.
pub const FLOW_LIFETIME: Duration = Duration::from_secs(600);
/// Every call to the provider (discovery, the code exchange, its keys) is bounded.
const PROVIDER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct OidcConfig {
    pub issuer: String,
    pub client_id: String,
    pub client_secret: String,
    pub redirect_url: String,
    pub tier: Tier,
    pub name: String,
}

impl OidcConfig {
    pub fn from_env() -> Result<Option<OidcConfig>, String> {
        let var = |n: &str| std::env::var(n).ok().filter(|v| !v.trim().is_empty());
        let Some(issuer) = var("HEARTH_OIDC_ISSUER") else {
            return Ok(None);
        };
        let need = |n: &str| {
            var(n).ok_or_else(|| format!("HEARTH_OIDC_ISSUER is set, so {n} must be too"))
        };
        let tier = var("HEARTH_OIDC_TIER").unwrap_or_else(|| "free".into());
        Ok(Some(OidcConfig {
            issuer,
            client_id: need("HEARTH_OIDC_CLIENT_ID")?,
            client_secret: need("HEARTH_OIDC_CLIENT_SECRET")?,
            redirect_url: need("HEARTH_OIDC_REDIRECT_URL")?,
            tier: Tier::parse(&tier).ok_or_else(|| {
                format!("HEARTH_OIDC_TIER must be free, pro or unlimited, not {tier:?}")
            })?,
            name: var("HEARTH_OIDC_NAME").unwrap_or_else(|| "OpenID".into()),
        }))
    }
}

/// A client made from the provider's discovery document.
type Client = CoreClient<
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

/// What the sealed flow cookie holds.
#[derive(Serialize, Deserialize)]
struct Flow {
    state: String,
    nonce: String,
    verifier: String,
    expires_at: i64,
}

fn http() -> AppResult<openidconnect::reqwest::Client> {
    // No redirects: a provider's answers are read as they are (the crate's advice, against SSRF).
    openidconnect::reqwest::ClientBuilder::new()
        .redirect(openidconnect::reqwest::redirect::Policy::none())
        .timeout(PROVIDER_TIMEOUT)
        .build()
        .map_err(|e| AppError::Internal(e.to_string()))
}

impl App {
    fn oidc_config(&self) -> AppResult<&OidcConfig> {
        self.config.oidc.as_ref().ok_or(AppError::NotFound(
            "OpenID Connect sign-in (not configured here)",
        ))
    }

    async fn oidc_client(
        &self,
        http: &openidconnect::reqwest::Client,
    ) -> AppResult<(OidcConfig, Client)> {
        let c = self.oidc_config()?.clone();
        let issuer = IssuerUrl::new(c.issuer.clone())
            .map_err(|e| AppError::Invalid(format!("HEARTH_OIDC_ISSUER: {e}")))?;
        let metadata = CoreProviderMetadata::discover_async(issuer, http)
            .await
            .map_err(|e| {
                AppError::Unavailable(format!("the OpenID provider's discovery failed: {e}"))
            })?;
        let redirect = RedirectUrl::new(c.redirect_url.clone())
            .map_err(|e| AppError::Invalid(format!("HEARTH_OIDC_REDIRECT_URL: {e}")))?;
        let client = CoreClient::from_provider_metadata(
            metadata,
            ClientId::new(c.client_id.clone()),
            Some(ClientSecret::new(c.client_secret.clone())),
        )
        .set_redirect_uri(redirect);
        Ok((c, client))
    }

    /// Where to send the browser, and the sealed cookie value that must come back with it.
    pub async fn oidc_start(&self) -> AppResult<(String, String)> {
        let http = http()?;
        let (_, client) = self.oidc_client(&http).await?;
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let (url, state, nonce) = client
            .authorize_url(
                CoreAuthenticationFlow::AuthorizationCode,
                CsrfToken::new_random,
                Nonce::new_random,
            )
            .add_scope(Scope::new("email".into()))
            .set_pkce_challenge(challenge)
            .url();
        let flow = Flow {
            state: state.secret().clone(),
            nonce: nonce.secret().clone(),
            verifier: verifier.secret().clone(),
            expires_at: self.now() + FLOW_LIFETIME.as_millis() as i64,
        };
        let sealed = self
            .master_key
            .seal(&serde_json::to_string(&flow).expect("serializable"));
        Ok((url.to_string(), hex::encode(sealed)))
    }

    /// Finishes a flow: the state must be the cookie's, the ID token must carry its nonce
    /// and a verified email. Signs that user in (made with the configured tier if new).
    pub async fn oidc_finish(
        &self,
        cookie: Option<&str>,
        state: &str,
        code: &str,
    ) -> AppResult<(User, NewSession)> {
        let refused = |why: &str| {
            AppError::Unauthenticated(format!("OpenID sign-in refused: {why}; try again"))
        };
        let flow: Flow = cookie
            .and_then(|c| hex::decode(c).ok())
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| self.master_key.open(&s).ok())
            .and_then(|s| serde_json::from_str(&s).ok())
            .ok_or_else(|| refused("this browser did not start the sign-in (no flow cookie)"))?;
        if flow.expires_at < self.now() {
            return Err(refused("the sign-in took longer than 10 minutes"));
        }
        if !crate::sign_in::same_secret(&flow.state, state) {
            return Err(refused("the state does not match"));
        }
        let http = http()?;
        let (config, client) = self.oidc_client(&http).await?;
        let token = client
            .exchange_code(AuthorizationCode::new(code.to_string()))
            .map_err(|e| AppError::Internal(e.to_string()))?
            .set_pkce_verifier(PkceCodeVerifier::new(flow.verifier))
            .request_async(&http)
            .await
            .map_err(|e| refused(&format!("the provider refused the code: {e}")))?;
        let id_token = token
            .id_token()
            .ok_or_else(|| refused("the provider sent no ID token"))?;
        let claims = id_token
            .claims(&client.id_token_verifier(), &Nonce::new(flow.nonce))
            .map_err(|e| refused(&format!("the ID token is not valid: {e}")))?;
        // Many providers put the email in the ID token; the others (and oidc-provider by
        // default) answer it from the userinfo endpoint, for the same subject.
        let (email, verified) = match claims.email() {
            Some(e) => (e.as_str().to_string(), claims.email_verified()),
            None => {
                let info: openidconnect::core::CoreUserInfoClaims = client
                    .user_info(token.access_token().clone(), Some(claims.subject().clone()))
                    .map_err(|e| {
                        refused(&format!(
                            "the provider has no userinfo endpoint and gave no email: {e}"
                        ))
                    })?
                    .request_async(&http)
                    .await
                    .map_err(|e| refused(&format!("the provider's userinfo failed: {e}")))?;
                let email = info
                    .email()
                    .map(|e| e.as_str().to_string())
                    .ok_or_else(|| refused("the provider gave no email"))?;
                (email, info.email_verified())
            }
        };
        let email = email.trim().to_string();
        if verified != Some(true) {
            return Err(refused("the provider has not verified that email"));
        }
        let user = match self.store.user_with_password(&email).await? {
            Some((user, _)) => user,
            None => match self
                .store
                .create_user(&email, Role::User, config.tier)
                .await
            {
                Ok((user, _)) => {
                    let _ = self
                        .store
                        .audit("system:oidc", "user_create", None, "success", None, None)
                        .await;
                    user
                }
                // Made by a concurrent sign-in a moment ago.
                Err(hearth_store::StoreError::Conflict(_)) => {
                    self.store
                        .user_with_password(&email)
                        .await?
                        .ok_or(AppError::NotFound("user"))?
                        .0
                }
                Err(e) => return Err(e.into()),
            },
        };
        let session = self
            .store
            .create_session(
                &user.id,
                crate::sign_in::SESSION_LIFETIME.as_millis() as i64,
            )
            .await?;
        let _ = self
            .store
            .audit(&user.id, "sign_in_oidc", None, "success", None, None)
            .await;
        Ok((user, session))
    }
}
