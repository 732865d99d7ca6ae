//! Frame authentication, sans-IO: keys come in as bytes, tags go out as bytes.
//!
//! Every frame carries a 128-bit tag: HMAC-SHA256 over the whole header and
//! shard, truncated to its first 16 bytes (RFC 2104; truncation as in
//! RFC 4868), keyed with a 32-byte key shared by sender and receiver. The MAC
//! was chosen by measurement on 1436-byte frames (docs/performance.md): it
//! needs no nonce, so no sender restart, repetition or resend can weaken it.
//!
//! A key's [`KeyId`] is derived from the key itself (the first 4 bytes of
//! SHA-256 over a domain label and the key), so operators never configure
//! ids, and the id reveals nothing usable about the key. The receiver looks
//! the id up among its keys (several during a rotation) and checks the tag in
//! constant time before anything else reads the frame.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// Bytes of a key file: 256 bits, the HMAC-SHA256 block-safe key size.
pub const KEY_LEN: usize = 32;
/// Bytes of the tag in each frame: 128 bits, the security level asked for
/// (a forger succeeds with probability 2^-128 per attempt).
pub const TAG_LEN: usize = 16;
/// Bytes of the key id in each frame header.
pub const KEY_ID_LEN: usize = 4;
/// Keys a receiver accepts at once: a rotation needs two (old and new); a
/// few more allow overlapping rotations of several senders sharing a key
/// list, and the bound keeps the per-frame key lookup a short scan.
pub const MAX_KEYS: usize = 8;

/// Domain label for key ids, so an id is never equal to any other use of
/// a hash of the key.
const KEY_ID_DOMAIN: &[u8] = b"weir frame key id v1\0";

/// The public name of a key, carried in every authenticated frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub u32);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}

/// A 32-byte link key, ready to tag or verify (its HMAC state precomputed).
/// `Debug` shows the key id only, never key bytes.
#[derive(Clone)]
pub struct Key {
    id: KeyId,
    mac: Hmac<Sha256>,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({})", self.id)
    }
}

impl Key {
    /// Takes the raw bytes of a key file; anything but exactly [`KEY_LEN`]
    /// bytes is refused.
    pub fn from_bytes(bytes: &[u8]) -> Result<Key, KeyError> {
        if bytes.len() != KEY_LEN {
            return Err(KeyError::Length { len: bytes.len() });
        }
        let digest = Sha256::new()
            .chain_update(KEY_ID_DOMAIN)
            .chain_update(bytes)
            .finalize();
        let id = KeyId(u32::from_be_bytes(
            digest[..KEY_ID_LEN].try_into().expect("4 bytes"),
        ));
        let mac = <Hmac<Sha256> as Mac>::new_from_slice(bytes).expect("HMAC takes any key length");
        Ok(Key { id, mac })
    }

    pub fn id(&self) -> KeyId {
        self.id
    }

    /// The frame tag of `message`.
    pub fn tag(&self, message: &[u8]) -> [u8; TAG_LEN] {
        let mut mac = self.mac.clone();
        mac.update(message);
        let full = mac.finalize().into_bytes();
        full[..TAG_LEN].try_into().expect("16 of 32 bytes")
    }

    /// Constant-time check of a truncated tag.
    fn verify(&self, message: &[u8], tag: &[u8]) -> bool {
        let mut mac = self.mac.clone();
        mac.update(message);
        tag.len() == TAG_LEN && mac.verify_truncated_left(tag).is_ok()
    }
}

/// How a sender protects the frames it writes.
#[derive(Debug, Clone)]
pub enum Signer {
    /// Tag every frame with this key.
    Key(Key),
    /// `[auth] disabled = true`: frames carry the unauthenticated flag and
    /// only their CRC32.
    Disabled,
}

impl Signer {
    pub fn key(&self) -> Option<&Key> {
        match self {
            Signer::Key(k) => Some(k),
            Signer::Disabled => None,
        }
    }
}

/// What a receiver accepts.
#[derive(Debug, Clone)]
pub struct Verifier {
    /// Empty means authentication is disabled (`[auth] disabled = true`).
    keys: Vec<Key>,
}

impl Verifier {
    /// A verifier that accepts frames tagged by any of `keys` (1 to
    /// [`MAX_KEYS`], with distinct ids) and nothing else.
    pub fn new(keys: Vec<Key>) -> Result<Verifier, KeyError> {
        if keys.is_empty() {
            return Err(KeyError::NoKeys);
        }
        if keys.len() > MAX_KEYS {
            return Err(KeyError::TooManyKeys { count: keys.len() });
        }
        for (i, k) in keys.iter().enumerate() {
            if keys[..i].iter().any(|other| other.id == k.id) {
                return Err(KeyError::DuplicateId { id: k.id });
            }
        }
        Ok(Verifier { keys })
    }

    /// A verifier that accepts only unauthenticated frames.
    pub fn disabled() -> Verifier {
        Verifier { keys: Vec::new() }
    }

    pub fn is_disabled(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn key_ids(&self) -> Vec<KeyId> {
        self.keys.iter().map(|k| k.id).collect()
    }

    /// Checks a frame's authentication: `tag` is `None` for a frame that
    /// says it is unauthenticated, `message` is everything the tag covers.
    pub fn check(&self, key_id: u32, message: &[u8], tag: Option<&[u8]>) -> Result<(), AuthError> {
        match (tag, self.is_disabled()) {
            (None, true) => Ok(()),
            (None, false) => Err(AuthError::Unauthenticated),
            (Some(_), true) => Err(AuthError::AuthenticationDisabled),
            (Some(tag), false) => {
                let id = KeyId(key_id);
                let key = self
                    .keys
                    .iter()
                    .find(|k| k.id == id)
                    .ok_or(AuthError::UnknownKey(id))?;
                if key.verify(message, tag) {
                    Ok(())
                } else {
                    Err(AuthError::BadTag(id))
                }
            }
        }
    }
}

/// Why a key or key list was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeyError {
    #[error("a key is exactly {KEY_LEN} bytes (as written by `weir-sender keygen`), this one is {len} bytes")]
    Length { len: usize },
    #[error("no key given")]
    NoKeys,
    #[error("{count} keys given; at most {MAX_KEYS} are accepted at once")]
    TooManyKeys { count: usize },
    #[error("two keys have the same key id {id}: the same key is listed twice")]
    DuplicateId { id: KeyId },
}

/// Why a frame failed authentication. Each maps to its own counter.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AuthError {
    #[error("unauthenticated frame, but this receiver requires authentication ([auth] key_files)")]
    Unauthenticated,
    #[error("authenticated frame, but this receiver has [auth] disabled = true: the two sides' [auth] settings must match")]
    AuthenticationDisabled,
    #[error("frame tagged with key id {0}, which is not among this receiver's keys")]
    UnknownKey(KeyId),
    #[error("frame tag does not match key {0}: forged, or altered after it was tagged")]
    BadTag(KeyId),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_id_is_derived_from_the_key_and_differs_between_keys() {
        let a = Key::from_bytes(&[1; KEY_LEN]).unwrap();
        let a2 = Key::from_bytes(&[1; KEY_LEN]).unwrap();
        let b = Key::from_bytes(&[2; KEY_LEN]).unwrap();
        assert_eq!(a.id(), a2.id());
        assert_ne!(a.id(), b.id());
        assert_eq!(format!("{a:?}"), format!("Key({})", a.id()));
    }

    #[test]
    fn keys_of_the_wrong_length_are_refused() {
        for len in [0, 16, 31, 33, 64, 65] {
            assert_eq!(
                Key::from_bytes(&vec![0; len]).unwrap_err(),
                KeyError::Length { len }
            );
        }
    }

    #[test]
    fn tag_matches_hmac_sha256_truncated_to_128_bits() {
        // RFC 4231 test case 2 ("Jefe"), but with a 32-byte key: compare
        // against a fresh HMAC computation rather than a fixed vector.
        let key = [0x0b; KEY_LEN];
        let k = Key::from_bytes(&key).unwrap();
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key).unwrap();
        mac.update(b"what do ya want for nothing?");
        let full = mac.finalize().into_bytes();
        assert_eq!(k.tag(b"what do ya want for nothing?"), full[..16]);
    }

    #[test]
    fn verifier_refuses_empty_duplicate_and_oversized_key_lists() {
        let k = |b: u8| Key::from_bytes(&[b; KEY_LEN]).unwrap();
        assert_eq!(Verifier::new(vec![]).unwrap_err(), KeyError::NoKeys);
        assert!(matches!(
            Verifier::new(vec![k(1), k(1)]).unwrap_err(),
            KeyError::DuplicateId { .. }
        ));
        let many: Vec<Key> = (0..=MAX_KEYS as u8).map(k).collect();
        assert!(matches!(
            Verifier::new(many).unwrap_err(),
            KeyError::TooManyKeys { .. }
        ));
    }

    #[test]
    fn verifier_reports_each_failure_reason() {
        let k1 = Key::from_bytes(&[1; KEY_LEN]).unwrap();
        let k2 = Key::from_bytes(&[2; KEY_LEN]).unwrap();
        let v = Verifier::new(vec![k1.clone()]).unwrap();
        let msg = b"header and shard";
        let tag = k1.tag(msg);
        assert_eq!(v.check(k1.id().0, msg, Some(&tag)), Ok(()));
        assert_eq!(
            v.check(k2.id().0, msg, Some(&k2.tag(msg))),
            Err(AuthError::UnknownKey(k2.id()))
        );
        assert_eq!(
            v.check(k1.id().0, b"header and shar!", Some(&tag)),
            Err(AuthError::BadTag(k1.id()))
        );
        assert_eq!(v.check(0, msg, None), Err(AuthError::Unauthenticated));
        let off = Verifier::disabled();
        assert_eq!(off.check(0, msg, None), Ok(()));
        assert_eq!(
            off.check(k1.id().0, msg, Some(&tag)),
            Err(AuthError::AuthenticationDisabled)
        );
    }
}
