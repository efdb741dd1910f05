//! A small HTTP verification service: how a real service links bioseal.
//!
//! ```sh
//! BIOSEAL_OPERATOR_TOKEN=$(head -c 32 /dev/urandom | base64) \
//!   cargo run --example verification_service -- 127.0.0.1:8080 /tmp/bioseal-demo
//! ```
//!
//! One [`Store`] shared by every handler (`Arc`); its calls block (sled, and
//! an fsync on enroll, revoke and failed verifies), so they run on tokio's
//! blocking pool. Errors map to HTTP status codes. The request log holds the
//! route, the status and the latency: never a subject id, an embedding or a
//! score (bioseal has none to give).
//!
//! Routes (JSON in, JSON out):
//! - `POST /verify` `{subject, purpose, embedding}` → 200 `{"decision": "match" | "no-match"}`
//! - `POST /add-template` `{subject, purpose, probe, embedding}` → 200
//!   `{"decision": ...}`: the template is added only after the probe matches
//!
//! Operator routes, which need `Authorization: Bearer <token>` (the token
//! from `BIOSEAL_OPERATOR_TOKEN`; compared in constant time; 401 without):
//! - `POST /enroll` `{subject, embedding, purposes, expires_unix, evidence_sha256}` → 201
//!   (409 if the subject is already enrolled)
//! - `POST /revoke` `{subject}` → 200 `{"shred": "shredded" | "pending"}`
//! - `POST /reset` `{subject}` → 200 (re-enables a subject disabled after
//!   too many failures)
//!
//! Split custody (SECURITY.md §17): an optional `user_key` field (64 hex
//! digits) on `/enroll`, `/verify` and `/add-template` enrolls and verifies
//! a subject whose templates only that key opens; a wrong or missing key is
//! 401 `{"error": "wrong or missing user key ..."}` and counts as a failed
//! attempt. `POST /rekey` `{subject, user_key, new_user_key}` → 200 changes it
//! (the person's request: no operator token).
//!
//! Where the user key comes from — a passkey's WebAuthn PRF extension, on
//! the person's device:
//! 1. Registration: the page creates the passkey with
//!    `navigator.credentials.create({publicKey: {..., extensions: {prf: {}}}})`
//!    and checks `getClientExtensionResults().prf.enabled`.
//! 2. Enrollment and every verification: the page asks for an assertion with
//!    `navigator.credentials.get({publicKey: {challenge, allowCredentials:
//!    [credential], extensions: {prf: {eval: {first: SALT}}}}})`, where SALT
//!    is this service's fixed 32 bytes (for example SHA-256 of
//!    "example.com bioseal user key v1"). The authenticator returns
//!    `getClientExtensionResults().prf.results.first`: 32 bytes, an HMAC
//!    under a secret that never leaves it, the same every time for this
//!    passkey and SALT (and on every device the passkey syncs to). The page
//!    sends them hex-encoded as `user_key`, over TLS, with the selfie's
//!    embedding; the server checks the assertion (signature, challenge,
//!    origin) before it calls bioseal, and keeps the key for that request
//!    only.
//! 3. Changing the key (a new passkey, or a new SALT): evaluate both, old as
//!    `first` and new as `second` (or two assertions), and `POST /rekey`.
//!    Losing the passkey loses the template: the person enrolls again.
//!
//! The service sees the user key during every such request: split custody
//! protects the templates at rest and in every copy, not from a
//! compromised service at the moment the person verifies (SECURITY.md §17).
//!
//! A real deployment puts more in front of this: TLS; operator credentials
//! per person from an identity provider, not one shared token; proof that
//! an enrollment comes from a checked ID document and a live capture
//! (presentation-attack detection), tied to the signed consent whose digest
//! is the evidence; a rate limit per client and per subject in front of
//! `/verify` (every refused or unknown-subject verify costs a key rotation,
//! and 50 wrong probes disable a subject: SECURITY.md §11); and one answer
//! for every refusal, so that status codes do not tell who is enrolled.

use axum::extract::{Json, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use bioseal::{
    Consent, Decision, Embedding, Error, Purpose, RootKey, ShredStatus, Store, StoreConfig,
    Threshold, Timestamp, UserKey,
};
use serde::Deserialize;
use std::sync::Arc;
use std::time::Instant;

/// The service's state: one store for every request, and the operator
/// token (wiped on drop).
#[derive(Clone)]
pub struct AppState {
    store: Arc<Store>,
    operator_token: Arc<zeroize::Zeroizing<String>>,
}

#[derive(Deserialize)]
pub struct AddTemplateRequest {
    subject: String,
    purpose: String,
    probe: Vec<f32>,
    embedding: Vec<f32>,
    /// Split custody: the person's user key, 64 hex digits.
    user_key: Option<HexKey>,
}

#[derive(Deserialize)]
pub struct EnrollRequest {
    subject: String,
    embedding: Vec<f32>,
    purposes: Vec<String>,
    expires_unix: u64,
    evidence_sha256: String,
    /// Split custody: the person's user key, 64 hex digits.
    user_key: Option<HexKey>,
}

#[derive(Deserialize)]
pub struct VerifyRequest {
    subject: String,
    purpose: String,
    embedding: Vec<f32>,
    /// Split custody: the person's user key, 64 hex digits.
    user_key: Option<HexKey>,
}

#[derive(Deserialize)]
pub struct RekeyRequest {
    subject: String,
    user_key: HexKey,
    new_user_key: HexKey,
}

#[derive(Deserialize)]
pub struct RevokeRequest {
    subject: String,
}

/// An error response: a status and a message that never holds input data.
pub struct ApiError(StatusCode, String, Option<u64>);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::NotEnrolled => StatusCode::NOT_FOUND,
            Error::AlreadyEnrolled => StatusCode::CONFLICT,
            Error::PurposeNotConsented => StatusCode::FORBIDDEN,
            Error::ConsentExpired | Error::RetentionExpired => StatusCode::GONE,
            Error::LockedOut { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::VerificationDisabled => StatusCode::LOCKED,
            Error::WrongUserKey => StatusCode::UNAUTHORIZED,
            Error::InvalidEmbedding(_)
            | Error::InvalidConsent(_)
            | Error::InvalidSubject
            | Error::InvalidUserKey(_)
            | Error::NotSplitCustody
            | Error::TooManyTemplates { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let retry = match &e {
            Error::LockedOut { until } => Some(until.unix_secs().saturating_sub(now_unix())),
            _ => None,
        };
        // Internal errors (tampering, keys, storage) are for the operator's
        // log, not for the client.
        let message = if status == StatusCode::INTERNAL_SERVER_ERROR {
            eprintln!("internal error: {e}");
            "internal error".to_string()
        } else {
            e.to_string()
        };
        ApiError(status, message, retry)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(serde_json::json!({ "error": self.1 }));
        match self.2 {
            Some(secs) => (self.0, [(header::RETRY_AFTER, secs.to_string())], body).into_response(),
            None => (self.0, body).into_response(),
        }
    }
}

fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::UNPROCESSABLE_ENTITY, msg.into(), None)
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Run a blocking store call on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|_| {
        Err(ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error".into(),
            None,
        ))
    })
}

fn purpose(name: &str) -> Result<Purpose, ApiError> {
    Purpose::new(name.to_owned()).map_err(|e| bad_request(e.to_string()))
}

fn hex32(s: &str) -> Result<[u8; 32], ApiError> {
    let bad = || bad_request("evidence_sha256 must be 64 hex digits");
    if s.len() != 64 || !s.is_ascii() {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// A user key as it arrives in a request: hex digits in a string wiped on
/// drop.
pub struct HexKey(zeroize::Zeroizing<String>);

impl<'de> Deserialize<'de> for HexKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(|s| HexKey(zeroize::Zeroizing::new(s)))
    }
}

impl HexKey {
    fn parse(&self) -> Result<UserKey, ApiError> {
        Ok(UserKey::parse(self.0.as_bytes())?)
    }
}

/// A request's `user_key` field, if any.
fn user_key(field: &Option<HexKey>) -> Result<Option<UserKey>, ApiError> {
    field.as_ref().map(HexKey::parse).transpose()
}

async fn enroll(
    State(st): State<AppState>,
    Json(req): Json<EnrollRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let purposes = req
        .purposes
        .iter()
        .map(|p| purpose(p))
        .collect::<Result<Vec<_>, _>>()?;
    let consent = Consent::new(purposes)
        .expires_at(Timestamp::from_unix_secs(req.expires_unix))
        .evidence(hex32(&req.evidence_sha256)?);
    let embedding = Embedding::new(req.embedding);
    let key = user_key(&req.user_key)?;
    blocking(move || {
        match &key {
            Some(k) => st.store.enroll_with(&req.subject, embedding, consent, k)?,
            None => st.store.enroll(&req.subject, embedding, consent)?,
        }
        Ok(())
    })
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({ "status": "enrolled" })),
    ))
}

async fn verify(
    State(st): State<AppState>,
    Json(req): Json<VerifyRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let purpose = purpose(&req.purpose)?;
    let probe = Embedding::new(req.embedding);
    let key = user_key(&req.user_key)?;
    let d = blocking(move || {
        Ok(match &key {
            Some(k) => st.store.verify_with(&req.subject, &purpose, probe, k)?,
            None => st.store.verify(&req.subject, &purpose, probe)?,
        })
    })
    .await?;
    let decision = match d {
        Decision::Match => "match",
        Decision::NoMatch => "no-match",
    };
    Ok(Json(serde_json::json!({ "decision": decision })))
}

async fn add_template(
    State(st): State<AppState>,
    Json(req): Json<AddTemplateRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let purpose = purpose(&req.purpose)?;
    let (probe, new) = (Embedding::new(req.probe), Embedding::new(req.embedding));
    let key = user_key(&req.user_key)?;
    let d = blocking(move || {
        Ok(match &key {
            Some(k) => st
                .store
                .add_template_with(&req.subject, &purpose, probe, new, k)?,
            None => st.store.add_template(&req.subject, &purpose, probe, new)?,
        })
    })
    .await?;
    let decision = match d {
        Decision::Match => "match",
        Decision::NoMatch => "no-match",
    };
    Ok(Json(serde_json::json!({ "decision": decision })))
}

async fn rekey(
    State(st): State<AppState>,
    Json(req): Json<RekeyRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let (old, new) = (req.user_key.parse()?, req.new_user_key.parse()?);
    blocking(move || Ok(st.store.rekey(&req.subject, &old, &new)?)).await?;
    Ok(Json(serde_json::json!({ "status": "rekeyed" })))
}

async fn reset(
    State(st): State<AppState>,
    Json(req): Json<RevokeRequest>,
) -> Result<impl IntoResponse, ApiError> {
    blocking(move || Ok(st.store.reset_attempts(&req.subject)?)).await?;
    Ok(Json(serde_json::json!({ "status": "reset" })))
}

/// Operator routes: `Authorization: Bearer <token>`, compared in constant
/// time; 401 otherwise.
async fn require_operator(
    State(st): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use subtle::ConstantTimeEq;
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let want = st.operator_token.as_bytes();
    let ok = given.len() == want.len() && bool::from(given.as_bytes().ct_eq(want));
    if !ok || want.is_empty() {
        return ApiError(
            StatusCode::UNAUTHORIZED,
            "operator token required".into(),
            None,
        )
        .into_response();
    }
    next.run(req).await
}

async fn revoke(
    State(st): State<AppState>,
    Json(req): Json<RevokeRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let r = blocking(move || Ok(st.store.revoke(&req.subject)?)).await?;
    let shred = match r.status {
        ShredStatus::Shredded { .. } => "shredded",
        ShredStatus::Pending => "pending",
    };
    Ok(Json(serde_json::json!({ "shred": shred })))
}

/// Log route, status and latency only.
async fn log_requests(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let (method, path, t) = (
        req.method().clone(),
        req.uri().path().to_owned(),
        Instant::now(),
    );
    let resp = next.run(req).await;
    eprintln!(
        "{method} {path} {} {:.1} ms",
        resp.status().as_u16(),
        t.elapsed().as_secs_f64() * 1e3
    );
    resp
}

/// The service's routes over `store`; the operator routes need
/// `operator_token` (an empty token refuses every operator request).
pub fn app(store: Arc<Store>, operator_token: String) -> Router {
    let state = AppState {
        store,
        operator_token: Arc::new(zeroize::Zeroizing::new(operator_token)),
    };
    let operator = Router::new()
        .route("/enroll", post(enroll))
        .route("/revoke", post(revoke))
        .route("/reset", post(reset))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_operator,
        ));
    Router::new()
        .route("/verify", post(verify))
        .route("/add-template", post(add_template))
        .route("/rekey", post(rekey))
        .merge(operator)
        .layer(axum::middleware::from_fn(log_requests))
        .with_state(state)
}

#[allow(dead_code)] // the integration test includes this file for `app`
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:8080".into());
    let dir = args
        .next()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("bioseal-demo"));
    // A demo key: a real service reads its root key from a 0600 file or a
    // KeyProvider (HSM/KMS), never from code.
    let store = Store::open(
        StoreConfig::new(dir.join("data"), RootKey::from_bytes([7; 32]))
            .key_dir(dir.join("keys"))
            .model("demo", 512)
            .threshold(Threshold::cosine(0.5)),
    )?;
    let token = std::env::var("BIOSEAL_OPERATOR_TOKEN")
        .map_err(|_| "set BIOSEAL_OPERATOR_TOKEN (the operator routes' bearer token)")?;
    if token.len() < 32 {
        return Err("BIOSEAL_OPERATOR_TOKEN must be at least 32 characters".into());
    }
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!(
        "listening on {} (store {})",
        listener.local_addr()?,
        dir.display()
    );
    axum::serve(listener, app(Arc::new(store), token)).await?;
    Ok(())
}
