//! The cluster's copy of a node's sessions is sealed before it goes to etcd: device addresses
//! and sink credentials are never there in clear. AES-256-GCM under a key every node of the
//! cluster holds (`cluster.record_key_file`), a random nonce per record, the etcd key as
//! associated data (a record cannot be moved to another session's key).

use ring::{
    aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey},
    digest, hmac,
    rand::{SecureRandom as _, SystemRandom},
};

/// Seals and opens records with the cluster's key.
pub struct Sealer {
    key: LessSafeKey,
    /// For pseudonyms: a key of its own, derived from the record key.
    names: hmac::Key,
    random: SystemRandom,
}

impl Sealer {
    pub fn new(key: &[u8; 32]) -> Self {
        let mut derivation = b"qod pseudonyms\0".to_vec();
        derivation.extend_from_slice(key);
        Self {
            key: LessSafeKey::new(
                #[allow(clippy::unwrap_used, reason = "a 32-byte key always fits AES-256")]
                UnboundKey::new(&AES_256_GCM, key).unwrap(),
            ),
            names: hmac::Key::new(
                hmac::HMAC_SHA256,
                digest::digest(&digest::SHA256, &derivation).as_ref(),
            ),
            random: SystemRandom::new(),
        }
    }

    /// A stable pseudonym for `name` (an API client, a sink's origin), for use in etcd keys and
    /// values: 32 hex digits of HMAC-SHA256 under the cluster's key, so every node derives the
    /// same one and etcd never holds the name itself.
    pub fn pseudonym(&self, name: &str) -> String {
        let tag = hmac::sign(&self.names, name.as_bytes());
        tag.as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// `plain` sealed for the etcd key `at`: nonce, then ciphertext and tag.
    pub fn seal(&self, at: &str, plain: &[u8]) -> Result<Vec<u8>, ring::error::Unspecified> {
        let mut nonce = [0u8; NONCE_LEN];
        self.random.fill(&mut nonce)?;
        let mut out = plain.to_vec();
        self.key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(at.as_bytes()),
            &mut out,
        )?;
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&out);
        Ok(sealed)
    }

    /// What [`Sealer::seal`] sealed for `at`, if this key sealed it there.
    pub fn open(&self, at: &str, sealed: &[u8]) -> Result<Vec<u8>, ring::error::Unspecified> {
        if sealed.len() < NONCE_LEN {
            return Err(ring::error::Unspecified);
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce)?;
        let mut body = body.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(at.as_bytes()), &mut body)?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_opens_only_with_its_key_at_its_place() {
        let s = Sealer::new(&[7; 32]);
        let sealed = s
            .seal("/qod/sessions/a/1", b"device 10.0.1.2")
            .expect("seal");
        assert!(!sealed.windows(8).any(|w| w == b"10.0.1.2"));
        assert_eq!(
            s.open("/qod/sessions/a/1", &sealed).expect("open"),
            b"device 10.0.1.2"
        );
        assert!(s.open("/qod/sessions/a/2", &sealed).is_err(), "moved");
        assert!(
            Sealer::new(&[8; 32])
                .open("/qod/sessions/a/1", &sealed)
                .is_err()
        );
        let mut bent = sealed.clone();
        bent[20] ^= 1;
        assert!(s.open("/qod/sessions/a/1", &bent).is_err(), "altered");
        assert!(s.open("/qod/sessions/a/1", &sealed[..5]).is_err());
    }

    #[test]
    fn a_pseudonym_is_stable_per_key_and_hides_the_name() {
        let (a, b) = (Sealer::new(&[7; 32]), Sealer::new(&[8; 32]));
        let p = a.pseudonym("client-x");
        assert_eq!(p.len(), 32);
        assert!(p.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(p, Sealer::new(&[7; 32]).pseudonym("client-x"));
        assert_ne!(p, a.pseudonym("client-y"));
        assert_ne!(p, b.pseudonym("client-x"));
        assert!(!p.contains("client"));
    }
}
