//! DEV ONLY: a throwaway local CA with server and client certificates, a JWT signing key with its
//! JWKS, and tokens minted with that key, for the demo, labs and tests (`qodctl dev …`).
//! Every key here sits unencrypted in a local directory; nothing of it belongs in production,
//! and `qodd` warns when it trusts the dev key.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header, jwk::Jwk};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::{Value, json};

/// Key ids of dev signing keys start with this (so `qodd` can warn).
pub const DEV_KID_PREFIX: &str = "qod-dev-";
/// The issuer of dev tokens.
pub const DEV_ISSUER: &str = "https://qod-dev.invalid";
/// The audience of dev tokens.
pub const DEV_AUDIENCE: &str = "qod";
/// The client certificate's CN, and the default client id.
pub const DEV_CLIENT: &str = "dev-client";

const FILES: [&str; 8] = [
    "ca.crt",
    "ca.key",
    "server.crt",
    "server.key",
    "client.crt",
    "client.key",
    "jwt-signing.key",
    "jwks.json",
];

/// A dev PKI in a directory.
pub struct DevPki {
    pub dir: PathBuf,
}

/// The claims of a dev token.
#[derive(Clone, Debug)]
pub struct TokenSpec {
    pub client: String,
    pub scopes: Vec<String>,
    /// A three-legged token's device (`tel:+…`, `ipv4:…`, `ipv6:…` or a Device object).
    pub device: Option<Value>,
    pub ttl: Duration,
}

impl TokenSpec {
    /// A two-legged token for `client` with every scope, valid for an hour.
    pub fn full(client: &str) -> Self {
        Self {
            client: client.to_owned(),
            scopes: crate::auth::scope::ALL.map(str::to_owned).to_vec(),
            device: None,
            ttl: Duration::from_secs(3600),
        }
    }

    /// The claims, as an identity provider would issue them.
    pub fn claims(&self) -> Value {
        let now = unix_now();
        json!({
            "iss": DEV_ISSUER,
            "aud": DEV_AUDIENCE,
            "client_id": self.client,
            "sub": self.device.clone().unwrap_or_else(|| Value::from(self.client.clone())),
            "scope": self.scopes.join(" "),
            "iat": now,
            "nbf": now,
            "exp": now + self.ttl.as_secs(),
        })
    }
}

/// Seconds since the epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name
        .push(DnType::CommonName, "qod DEV-ONLY CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(p)
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("write {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

impl DevPki {
    /// Opens the dev PKI in `dir`, creating it (all files anew) unless it is complete.
    pub fn ensure(dir: &Path) -> anyhow::Result<Self> {
        let pki = Self {
            dir: dir.to_owned(),
        };
        if FILES.iter().all(|f| dir.join(f).exists()) {
            return Ok(pki);
        }
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let ca_key = KeyPair::generate()?;
        let ca = ca_params()?.self_signed(&ca_key)?;
        fs::write(dir.join("ca.crt"), ca.pem())?;
        write_private(&dir.join("ca.key"), &ca_key.serialize_pem())?;

        let issuer = Issuer::new(ca_params()?, ca_key);
        let mut server = CertificateParams::new(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ])?;
        server
            .distinguished_name
            .push(DnType::CommonName, "qodd DEV-ONLY server");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate()?;
        fs::write(
            dir.join("server.crt"),
            server.signed_by(&server_key, &issuer)?.pem(),
        )?;
        write_private(&dir.join("server.key"), &server_key.serialize_pem())?;

        let (cert, key) = pki.client_cert_with(&issuer, DEV_CLIENT)?;
        fs::write(dir.join("client.crt"), cert)?;
        write_private(&dir.join("client.key"), &key)?;

        let jwt_key = KeyPair::generate()?;
        write_private(&dir.join("jwt-signing.key"), &jwt_key.serialize_pem())?;
        let jwks = json!({ "keys": [pki.jwk(&jwt_key.serialize_pem())?] });
        fs::write(dir.join("jwks.json"), serde_json::to_string_pretty(&jwks)?)?;
        Ok(pki)
    }

    fn jwk(&self, signing_pem: &str) -> anyhow::Result<Value> {
        let key = EncodingKey::from_ec_pem(signing_pem.as_bytes())?;
        let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256)?;
        jwk.common.key_id = Some(format!("{DEV_KID_PREFIX}es256"));
        Ok(serde_json::to_value(jwk)?)
    }

    fn client_cert_with(
        &self,
        issuer: &Issuer<'_, KeyPair>,
        cn: &str,
    ) -> anyhow::Result<(String, String)> {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate()?;
        Ok((p.signed_by(&key, issuer)?.pem(), key.serialize_pem()))
    }

    /// A new client certificate (PEM chain, PEM key) with subject CN `cn`, from the dev CA.
    pub fn client_cert(&self, cn: &str) -> anyhow::Result<(String, String)> {
        let ca_key = KeyPair::from_pem(&fs::read_to_string(self.path("ca.key"))?)?;
        self.client_cert_with(&Issuer::new(ca_params()?, ca_key), cn)
    }

    /// A new server certificate (PEM chain, PEM key) for `names` (DNS names or addresses),
    /// from the dev CA: for the other servers of a lab (an etcd member, a sink).
    pub fn server_cert(&self, names: &[&str]) -> anyhow::Result<(String, String)> {
        let ca_key = KeyPair::from_pem(&fs::read_to_string(self.path("ca.key"))?)?;
        let issuer = Issuer::new(ca_params()?, ca_key);
        let mut p =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())?;
        p.distinguished_name
            .push(DnType::CommonName, "DEV-ONLY lab server");
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        Ok((p.signed_by(&key, &issuer)?.pem(), key.serialize_pem()))
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    pub fn read(&self, file: &str) -> anyhow::Result<Vec<u8>> {
        fs::read(self.path(file)).with_context(|| format!("read {}", self.path(file).display()))
    }

    /// Signs `claims` with the dev key.
    pub fn sign(&self, claims: &Value) -> anyhow::Result<String> {
        let key = EncodingKey::from_ec_pem(&self.read("jwt-signing.key")?)?;
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(format!("{DEV_KID_PREFIX}es256"));
        Ok(jsonwebtoken::encode(&header, claims, &key)?)
    }

    /// A token for `spec`.
    pub fn mint(&self, spec: &TokenSpec) -> anyhow::Result<String> {
        self.sign(&spec.claims())
    }

    /// `[tls]` and `[auth]` sections of a `qodd` config that trust this PKI.
    pub fn config_toml(&self) -> String {
        format!(
            "[tls]\ncert = {:?}\nkey = {:?}\n\n[auth]\njwks_file = {:?}\nissuer = {DEV_ISSUER:?}\naudience = {DEV_AUDIENCE:?}\n",
            self.path("server.crt"),
            self.path("server.key"),
            self.path("jwks.json"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{TokenRules, Verifier, jwt::parse_jwks};

    /// The dev key's tokens verify against its JWKS; another PKI's do not.
    #[test]
    fn dev_tokens_verify_against_the_dev_jwks() {
        let (a, b) = (
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
        );
        let (a, b) = (
            DevPki::ensure(a.path()).expect("pki"),
            DevPki::ensure(b.path()).expect("pki"),
        );
        let rules = TokenRules {
            issuer: DEV_ISSUER.into(),
            audience: DEV_AUDIENCE.into(),
            leeway: Duration::from_secs(5),
            algorithms: vec![Algorithm::ES256],
        };
        let jwks = String::from_utf8(a.read("jwks.json").expect("jwks")).expect("utf8");
        let verifier = Verifier::new(rules, parse_jwks(&jwks, &[Algorithm::ES256]).expect("keys"));
        let claims = verifier
            .verify(&a.mint(&TokenSpec::full("c1")).expect("mint"))
            .expect("valid");
        assert_eq!(claims["client_id"], "c1");
        // A CAMARA Device object as `sub` (a three-legged token) verifies too.
        let mut spec = TokenSpec::full("c1");
        spec.device = Some(json!({"ipv4Address": {"publicAddress": "10.0.1.2"}}));
        let claims = verifier
            .verify(&a.mint(&spec).expect("mint"))
            .expect("a Device object as sub");
        assert_eq!(claims["sub"]["ipv4Address"]["publicAddress"], "10.0.1.2");
        assert!(
            verifier
                .verify(&b.mint(&TokenSpec::full("c1")).expect("mint"))
                .is_err()
        );
        // Idempotent: a complete directory is kept as it is.
        let before = a.read("jwks.json").expect("jwks");
        let again = DevPki::ensure(&a.dir).expect("again");
        assert_eq!(again.read("jwks.json").expect("jwks"), before);
    }
}
