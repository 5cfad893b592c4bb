//! Access-token verification: JWTs signed with a key of a JWKS (file or URL, refreshed in the
//! background), checked for algorithm, signature, `exp` / `nbf` (with leeway), `iss` and `aud`.

use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use base64::Engine as _;
use jsonwebtoken::{
    Algorithm, DecodingKey, decode_header,
    errors::ErrorKind,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm},
};
use serde_json::{Map, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The signature algorithms qodd can accept. Symmetric (HS*) and `none` never are.
pub const SUPPORTED_ALGORITHMS: [Algorithm; 3] =
    [Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA];

/// Where the trusted keys come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JwksSource {
    File(PathBuf),
    Url(url::Url),
}

impl std::fmt::Display for JwksSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(p) => write!(f, "{}", p.display()),
            Self::Url(u) => write!(f, "{u}"),
        }
    }
}

/// What a token must satisfy.
#[derive(Clone, Debug)]
pub struct TokenRules {
    pub issuer: String,
    pub audience: String,
    pub leeway: Duration,
    pub algorithms: Vec<Algorithm>,
}

/// One trusted verification key.
struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// Parses a JWKS document into the keys usable with `algorithms`; unusable keys are skipped
/// with the reason (an empty result is an error: nothing could ever verify).
pub fn parse_jwks(text: &str, algorithms: &[Algorithm]) -> Result<KeySet, String> {
    let doc: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let keys = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("no `keys` array (expected a JWK Set)")?;
    let mut out = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        match usable_key(k, algorithms) {
            Ok(key) => out.push(key),
            Err(why) => warn!(key = i, kid = ?k.get("kid"), "JWKS key skipped: {why}"),
        }
    }
    if out.is_empty() {
        return Err(format!(
            "none of its {} keys is usable with the accepted algorithms {algorithms:?}",
            keys.len()
        ));
    }
    Ok(KeySet(out))
}

fn usable_key(k: &Value, algorithms: &[Algorithm]) -> Result<Key, String> {
    let jwk: Jwk = serde_json::from_value(k.clone()).map_err(|e| e.to_string())?;
    let implied = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        AlgorithmParameters::OctetKey(_) => return Err("symmetric keys are never trusted".into()),
        _ => return Err("unsupported key type or curve".into()),
    };
    let alg = match jwk.common.key_algorithm {
        None => implied,
        Some(KeyAlgorithm::RS256) => Algorithm::RS256,
        Some(KeyAlgorithm::ES256) => Algorithm::ES256,
        Some(KeyAlgorithm::EdDSA) => Algorithm::EdDSA,
        Some(other) => return Err(format!("algorithm {other:?} is not supported")),
    };
    if alg != implied {
        return Err(format!("`alg` {alg:?} does not match the key type"));
    }
    if !algorithms.contains(&alg) {
        return Err(format!(
            "algorithm {alg:?} is not accepted by the configuration"
        ));
    }
    Ok(Key {
        kid: jwk.common.key_id.clone(),
        alg,
        key: DecodingKey::from_jwk(&jwk).map_err(|e| e.to_string())?,
    })
}

/// The keys of one JWKS.
pub struct KeySet(Vec<Key>);

impl KeySet {
    /// No keys: every token is refused (until a refresh brings some).
    pub fn empty() -> Self {
        Self(Vec::new())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Key ids, for the start-up log (and to warn about the dev key).
    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.0.iter().filter_map(|k| k.kid.as_deref())
    }
}

/// Verifies tokens against the current key set.
pub struct Verifier {
    rules: TokenRules,
    keys: RwLock<Arc<KeySet>>,
    /// Woken when a token names a key id we do not have (a rotation we have not seen yet).
    refresh: Notify,
    /// Tokens already verified, with their claims, until they expire: a client reuses its
    /// token for many calls, and a signature check costs far more than the call's own work.
    /// Emptied whenever the key set changes.
    verified: std::sync::Mutex<VerifiedCache>,
}

/// Verified tokens and the key-set generation they were verified under: a verification that
/// raced a key change must not land in the emptied cache.
#[derive(Default)]
struct VerifiedCache {
    generation: u64,
    tokens: std::collections::HashMap<String, Map<String, Value>>,
}

/// Most tokens remembered as verified (the cache is emptied when full).
const VERIFIED_CACHE: usize = 65_536;

impl Verifier {
    pub fn new(rules: TokenRules, keys: KeySet) -> Self {
        Self {
            rules,
            keys: RwLock::new(Arc::new(keys)),
            refresh: Notify::new(),
            verified: std::sync::Mutex::default(),
        }
    }

    /// Asks the refresh loop to read the key set now.
    pub fn request_refresh(&self) {
        self.refresh.notify_one();
    }

    fn keys(&self) -> Arc<KeySet> {
        self.keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The token's claims if it is valid; otherwise why not (safe to show the caller).
    pub fn verify(&self, token: &str) -> Result<Map<String, Value>, String> {
        let now = jsonwebtoken::get_current_timestamp();
        let lock = || {
            self.verified
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        let generation = {
            let cache = lock();
            if let Some(claims) = cache.tokens.get(token)
                // Still within `exp` (less the leeway: the cache never extends a token's life).
                && numeric_date(claims.get("exp")).is_some_and(|exp| exp > now)
            {
                return Ok(claims.clone());
            }
            cache.generation
        };
        let claims = self.verify_signed(token)?;
        let mut cache = lock();
        if cache.generation == generation {
            if cache.tokens.len() >= VERIFIED_CACHE {
                cache.tokens.clear();
            }
            cache.tokens.insert(token.to_owned(), claims.clone());
        }
        Ok(claims)
    }

    fn verify_signed(&self, token: &str) -> Result<Map<String, Value>, String> {
        let header = decode_header(token)
            .map_err(|_| "the access token is not a well-formed signed JWT".to_owned())?;
        if let Some(typ) = &header.typ
            && !access_token_type(typ)
        {
            return Err(format!(
                "the access token's type (typ) {typ:?} is not an access token's (at+jwt or JWT)"
            ));
        }
        if !self.rules.algorithms.contains(&header.alg) {
            return Err(format!(
                "the access token's algorithm {:?} is not accepted",
                header.alg
            ));
        }
        let keys = self.keys();
        let mut candidates = keys
            .0
            .iter()
            .filter(|k| k.alg == header.alg)
            .filter(|k| header.kid.is_none() || k.kid == header.kid)
            .peekable();
        if candidates.peek().is_none() {
            if header.kid.is_some() {
                self.refresh.notify_one();
            }
            return Err("the access token is signed with a key that is not trusted".into());
        }
        // The signature is checked by the JWT library; the claims are read here, since the
        // library's own claim check cannot read a `sub` that is an object (a CAMARA Device).
        let (message, signature) = token
            .rsplit_once('.')
            .ok_or_else(|| "the access token is not a well-formed signed JWT".to_owned())?;
        let mut verified = false;
        for k in candidates {
            match jsonwebtoken::crypto::verify(signature, message.as_bytes(), &k.key, header.alg) {
                Ok(true) => {
                    verified = true;
                    break;
                }
                Ok(false) => continue,
                Err(e) => return Err(describe(e.kind())),
            }
        }
        if !verified {
            return Err("the access token's signature does not verify".into());
        }
        let payload = message
            .split_once('.')
            .map(|(_, p)| p)
            .and_then(|p| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(p)
                    .ok()
            })
            .ok_or_else(|| "the access token's claims are not base64url".to_owned())?;
        let claims: Map<String, Value> = serde_json::from_slice(&payload)
            .map_err(|_| "the access token's claims are not a JSON object".to_owned())?;
        check_claims(claims, &self.rules)
    }

    fn replace(&self, keys: KeySet) {
        *self
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(keys);
        // A key that left the set no longer vouches for its tokens. The generation moves after
        // the swap, so a verification that read the old keys cannot be cached any more.
        let mut cache = self
            .verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        cache.generation += 1;
        cache.tokens.clear();
    }

    /// Re-reads the key set every `every`, and soon after a token names an unknown key id (at
    /// most once per `min_gap`). A failed read keeps the current keys.
    pub async fn refresh_loop(
        self: Arc<Self>,
        source: JwksSource,
        every: Duration,
        stop: CancellationToken,
    ) {
        const MIN_GAP: Duration = Duration::from_secs(10);
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = self.refresh.notified() => {}
                () = stop.cancelled() => return,
            }
            match fetch(&source)
                .await
                .and_then(|t| parse_jwks(&t, &self.rules.algorithms))
            {
                Ok(keys) => {
                    info!(source = %source, keys = keys.len(), "JWKS refreshed");
                    self.replace(keys);
                }
                Err(e) => {
                    warn!(source = %source, error = %e, "JWKS refresh failed; keeping the current keys");
                    // Without any key every call is refused: keep trying.
                    if self.keys().is_empty() {
                        self.refresh.notify_one();
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(MIN_GAP) => {}
                () = stop.cancelled() => return,
            }
        }
    }
}

/// Reads a JWKS document.
pub async fn fetch(source: &JwksSource) -> Result<String, String> {
    match source {
        JwksSource::File(path) => tokio::fs::read_to_string(path)
            .await
            .map_err(|e| format!("cannot read {}: {e}", path.display())),
        JwksSource::Url(url) => {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .map_err(|e| e.to_string())?;
            let response = client
                .get(url.clone())
                .send()
                .await
                .and_then(reqwest::Response::error_for_status)
                .map_err(|e| format!("cannot fetch {url}: {e}"))?;
            response
                .text()
                .await
                .map_err(|e| format!("cannot read {url}: {e}"))
        }
    }
}

/// An RFC 7519 NumericDate (seconds, possibly fractional), floored to whole seconds.
pub fn numeric_date(v: Option<&Value>) -> Option<u64> {
    let v = v?;
    v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0 && *f < u64::MAX as f64)
            .map(|f| f.floor() as u64)
    })
}

/// RFC 9068 §2.1: an access token's `typ` is `at+jwt` (`application/at+jwt`); plain `JWT` is
/// accepted too, since many identity providers still issue it. Any other type (an ID token, a
/// DPoP proof, a logout token) is a token of another kind and must not open the API. The media
/// type is compared case-insensitively (RFC 7515 §4.1.9).
fn access_token_type(typ: &str) -> bool {
    let t = typ.to_ascii_lowercase();
    let t = t.strip_prefix("application/").unwrap_or(&t);
    t == "at+jwt" || t == "jwt"
}

/// RFC 7519 §4.1: `iss` must be the trusted issuer, `aud` (a string or an array) must hold our
/// audience, `exp` and `nbf` are NumericDates (fractional ones included) checked with leeway.
fn check_claims(
    claims: Map<String, Value>,
    rules: &TokenRules,
) -> Result<Map<String, Value>, String> {
    match claims.get("iss") {
        None => return Err("the access token has no `iss` claim".into()),
        Some(Value::String(iss)) if *iss == rules.issuer => {}
        Some(Value::String(_)) => {
            return Err("the access token was issued by an untrusted issuer".into());
        }
        Some(_) => return Err("the access token's `iss` claim is malformed".into()),
    }
    let ours = |v: &Value| v.as_str() == Some(rules.audience.as_str());
    let audience_ok = match claims.get("aud") {
        None => return Err("the access token has no `aud` claim".into()),
        Some(Value::Array(all)) if all.iter().all(Value::is_string) => all.iter().any(ours),
        Some(one @ Value::String(_)) => ours(one),
        Some(_) => return Err("the access token's `aud` claim is malformed".into()),
    };
    if !audience_ok {
        return Err("the access token is meant for another audience".into());
    }
    if !claims.contains_key("exp") {
        return Err("the access token has no `exp` claim".into());
    }
    check_times(claims, rules.leeway.as_secs())
}

/// `exp` and `nbf` checked as NumericDates, fractional ones included.
fn check_times(claims: Map<String, Value>, leeway: u64) -> Result<Map<String, Value>, String> {
    let now = jsonwebtoken::get_current_timestamp();
    let exp = numeric_date(claims.get("exp"))
        .ok_or_else(|| "the access token's `exp` claim is malformed".to_owned())?;
    if exp.saturating_add(leeway) <= now {
        return Err("the access token has expired".into());
    }
    if let Some(nbf) = claims.get("nbf") {
        let nbf = numeric_date(Some(nbf))
            .ok_or_else(|| "the access token's `nbf` claim is malformed".to_owned())?;
        if nbf > now.saturating_add(leeway) {
            return Err("the access token is not valid yet (nbf)".into());
        }
    }
    Ok(claims)
}

fn describe(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::InvalidAlgorithm => "the access token's algorithm does not match its key".into(),
        _ => "the access token is not valid".into(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_access_token_types_are_accepted() {
        for ok in ["at+jwt", "application/at+jwt", "AT+JWT", "JWT", "jwt"] {
            assert!(super::access_token_type(ok), "{ok}");
        }
        for refused in ["dpop+jwt", "logout+jwt", "id_token+jwt", "JOSE", ""] {
            assert!(!super::access_token_type(refused), "{refused}");
        }
    }
}
