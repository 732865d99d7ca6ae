//! Frame authentication and encryption, sans-IO: keys come in as bytes,
//! sealed shards and tags go out as bytes.
//!
//! Every frame's shard is encrypted with AES-256-GCM and its 36-byte header
//! is the associated data, so the 128-bit GCM tag in each frame covers the
//! whole header and the shard; the tag sits where the frame's MAC used to.
//! AES-256-GCM (ring) was chosen by measurement on 1436-byte frames
//! (docs/performance.md): it costs about a third of HMAC-SHA256 per byte.
//!
//! GCM needs a nonce that never repeats under one key. weir never sends a
//! nonce: each sender session seals with its own subkey, derived with
//! HKDF-SHA256 from the 32-byte link key, the key id and the session id,
//! and the nonce is the frame's place in its session ([`FrameId`]: control
//! flag, block or control sequence, shard index), which the encoder never
//! reuses for other bytes. docs/wire-format.md ("Authentication") gives the
//! whole argument.
//!
//! A key's [`KeyId`] is derived from the key itself (the first 4 bytes of
//! SHA-256 over a domain label and the key), so operators never configure
//! ids, and the id reveals nothing usable about the key. The receiver looks
//! the id up among its keys (several during a rotation), takes the session's
//! subkey from a small cache (derived once per session), and opens the shard
//! in place; nothing else reads the frame before the tag is checked.

use std::fmt;
use std::sync::OnceLock;

use ring::{aead, hkdf};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// Bytes of a key file: 256 bits, an AES-256 key's worth of entropy.
pub const KEY_LEN: usize = 32;
/// Bytes of the tag in each frame: 128 bits, the full GCM tag (a forger
/// succeeds with probability about 2^-128 per attempt for these lengths).
pub const TAG_LEN: usize = 16;
/// Bytes of the key id in each frame header.
pub const KEY_ID_LEN: usize = 4;
/// Keys a receiver accepts at once: a rotation needs two (old and new); a
/// few more allow overlapping rotations of several senders sharing a key
/// list, and the bound keeps the per-frame key lookup a short scan.
pub const MAX_KEYS: usize = 8;
/// Session subkeys a receiver keeps derived. A receiver follows one live
/// sender session; at most one other (a restarted sender, the candidate
/// that will take over) is current beside it, and late or replayed frames
/// of a just-retired session may still arrive. Four holds all of these, so
/// the live session's subkey is never evicted by them; the lookup is a
/// scan of four entries, cheaper than hashing.
pub const SUBKEY_CACHE: usize = 4;
/// The frame protection's name, as receivers and senders report it.
pub const SCHEME: &str = "aes-256-gcm";

const _: () = assert!(
    TAG_LEN == aead::MAX_TAG_LEN,
    "the frame tag is the whole GCM tag"
);
const _: () = assert!(
    KEY_LEN == 32,
    "AES-256 subkeys are derived from 32-byte keys"
);

/// Domain label for key ids, so an id is never equal to any other use of
/// a hash of the key.
const KEY_ID_DOMAIN: &[u8] = b"weir frame key id v1\0";
/// HKDF salt: the extract step is bound to this protocol's subkeys.
const SUBKEY_SALT: &[u8] = b"weir frame subkey salt v1\0";
/// First part of the HKDF info, followed by the key id and the session id.
const SUBKEY_INFO: &[u8] = b"weir aes-256-gcm session subkey v1\0";

/// The public name of a key, carried in every authenticated frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub u32);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}

/// A frame's place in its session, from which its GCM nonce is built:
/// (control, block, index) is never reused for other bytes by one sender
/// session (docs/wire-format.md, "Why a nonce never repeats").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrameId {
    /// A control frame: `block` is then the control sequence number.
    pub control: bool,
    pub block: u64,
    pub index: u16,
}

impl FrameId {
    /// The 96-bit nonce: block (8 bytes, big-endian), index (2), control
    /// flag (1), zero (1). Injective in the three fields.
    fn nonce(&self) -> aead::Nonce {
        let mut n = [0u8; aead::NONCE_LEN];
        n[0..8].copy_from_slice(&self.block.to_be_bytes());
        n[8..10].copy_from_slice(&self.index.to_be_bytes());
        n[10] = u8::from(self.control);
        aead::Nonce::assume_unique_for_key(n)
    }
}

/// One sender session's AES-256-GCM subkey.
#[derive(Clone)]
struct SessionKey {
    session: u64,
    aead: aead::LessSafeKey,
}

/// A 32-byte link key, ready to derive session subkeys (its HKDF extract
/// step precomputed). `Debug` shows the key id only, never key bytes.
#[derive(Clone)]
pub struct Key {
    id: KeyId,
    /// Boxed: the HMAC and GCM states take about a kilobyte.
    secret: Box<KeySecret>,
}

#[derive(Clone)]
struct KeySecret {
    prk: hkdf::Prk,
    /// The subkey of the first session this key sealed for: a sender seals
    /// for one session only, and derives its subkey once.
    sealing: OnceLock<SessionKey>,
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
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, SUBKEY_SALT).extract(bytes);
        Ok(Key {
            id,
            secret: Box::new(KeySecret {
                prk,
                sealing: OnceLock::new(),
            }),
        })
    }

    pub fn id(&self) -> KeyId {
        self.id
    }

    /// The AES-256-GCM subkey of `session`: HKDF-SHA256 (RFC 5869) with
    /// salt [`SUBKEY_SALT`], the link key as input keying material, and
    /// info = [`SUBKEY_INFO`] ‖ key id ‖ session id (big-endian).
    fn derive(&self, session: u64) -> SessionKey {
        let id = self.id.0.to_be_bytes();
        let session_bytes = session.to_be_bytes();
        let info: [&[u8]; 3] = [SUBKEY_INFO, &id, &session_bytes];
        let okm = self
            .secret
            .prk
            .expand(&info, &aead::AES_256_GCM)
            .expect("32 bytes is far below HKDF-SHA256's output limit");
        SessionKey {
            session,
            aead: aead::LessSafeKey::new(aead::UnboundKey::from(okm)),
        }
    }

    /// Encrypts `shard` in place under `session`'s subkey, with `header`
    /// as associated data, and returns the tag. The caller guarantees that
    /// `frame` is never sealed twice in one session with different bytes.
    pub fn seal(
        &self,
        session: u64,
        frame: FrameId,
        header: &[u8],
        shard: &mut [u8],
    ) -> [u8; TAG_LEN] {
        let cached = self.secret.sealing.get_or_init(|| self.derive(session));
        let derived;
        let key = if cached.session == session {
            cached
        } else {
            // Another session through the same key: only tests do this.
            derived = self.derive(session);
            &derived
        };
        let tag = key
            .aead
            .seal_in_place_separate_tag(frame.nonce(), aead::Aad::from(header), shard)
            .expect("a shard of at most 64 KiB is far below GCM's message limit");
        tag.as_ref().try_into().expect("16-byte GCM tag")
    }
}

/// How a sender protects the frames it writes.
#[derive(Debug, Clone)]
pub enum Signer {
    /// Encrypt and tag every frame with a session subkey of this key.
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

/// A derived session subkey kept by a receiver.
#[derive(Clone)]
struct CachedSubkey {
    id: KeyId,
    key: SessionKey,
    /// Value of `Verifier::clock` when a frame last opened with it.
    used: u64,
}

/// What a receiver accepts.
#[derive(Clone)]
pub struct Verifier {
    /// Empty means authentication is disabled (`[auth] disabled = true`).
    keys: Vec<Key>,
    /// At most [`SUBKEY_CACHE`] subkeys, the least recently used replaced.
    /// Only a subkey that opened a frame is kept: forged frames, whatever
    /// session id they name, cannot evict the live session's subkey.
    subkeys: Vec<CachedSubkey>,
    clock: u64,
    derivations: u64,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("keys", &self.keys)
            .field("cached_subkeys", &self.subkeys.len())
            .finish()
    }
}

impl Verifier {
    /// A verifier that accepts frames sealed by any of `keys` (1 to
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
        Ok(Verifier {
            keys,
            subkeys: Vec::with_capacity(SUBKEY_CACHE),
            clock: 0,
            derivations: 0,
        })
    }

    /// A verifier that accepts only unauthenticated frames.
    pub fn disabled() -> Verifier {
        Verifier {
            keys: Vec::new(),
            subkeys: Vec::new(),
            clock: 0,
            derivations: 0,
        }
    }

    pub fn is_disabled(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn key_ids(&self) -> Vec<KeyId> {
        self.keys.iter().map(|k| k.id).collect()
    }

    /// Session subkeys derived so far (each costs an HKDF expand and an AES
    /// key schedule; a cache hit costs neither).
    pub fn subkey_derivations(&self) -> u64 {
        self.derivations
    }

    /// Checks a frame's authentication and decrypts its shard in place.
    /// `tag` is `None` for a frame that says it is unauthenticated (the
    /// shard is then left as it is); `header` is the associated data. On
    /// failure the shard's bytes are unspecified and must not be used.
    pub fn open(
        &mut self,
        key_id: u32,
        session: u64,
        frame: FrameId,
        header: &[u8],
        shard: &mut [u8],
        tag: Option<&[u8]>,
    ) -> Result<(), AuthError> {
        let tag = match (tag, self.is_disabled()) {
            (None, true) => return Ok(()),
            (None, false) => return Err(AuthError::Unauthenticated),
            (Some(_), true) => return Err(AuthError::AuthenticationDisabled),
            (Some(tag), false) => tag,
        };
        let id = KeyId(key_id);
        let Some(key) = self.keys.iter().find(|k| k.id == id) else {
            return Err(AuthError::UnknownKey(id));
        };
        let tag = aead::Tag::try_from(tag).map_err(|_| AuthError::BadTag(id))?;
        let aad = aead::Aad::from(header);
        self.clock = self.clock.wrapping_add(1);
        if let Some(cached) = self
            .subkeys
            .iter_mut()
            .find(|c| c.id == id && c.key.session == session)
        {
            cached
                .key
                .aead
                .open_in_place_separate_tag(frame.nonce(), aad, tag, shard, 0..)
                .map_err(|_| AuthError::BadTag(id))?;
            cached.used = self.clock;
            return Ok(());
        }
        let derived = key.derive(session);
        self.derivations = self.derivations.saturating_add(1);
        derived
            .aead
            .open_in_place_separate_tag(frame.nonce(), aad, tag, shard, 0..)
            .map_err(|_| AuthError::BadTag(id))?;
        let entry = CachedSubkey {
            id,
            key: derived,
            used: self.clock,
        };
        if self.subkeys.len() < SUBKEY_CACHE {
            self.subkeys.push(entry);
        } else {
            let oldest = self
                .subkeys
                .iter_mut()
                .min_by_key(|c| c.used)
                .expect("the cache is full, so not empty");
            *oldest = entry;
        }
        debug_assert!(self.subkeys.len() <= SUBKEY_CACHE);
        Ok(())
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
    #[error("frame tag does not match key {0}: forged, altered after it was sealed, or replayed under another session")]
    BadTag(KeyId),
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAME: FrameId = FrameId {
        control: false,
        block: 42,
        index: 3,
    };

    fn key(b: u8) -> Key {
        Key::from_bytes(&[b; KEY_LEN]).unwrap()
    }

    /// Seals `plain` as (session, FRAME) and returns (ciphertext, tag).
    fn seal(k: &Key, session: u64, plain: &[u8]) -> (Vec<u8>, [u8; TAG_LEN]) {
        let mut buf = plain.to_vec();
        let tag = k.seal(session, FRAME, b"header", &mut buf);
        (buf, tag)
    }

    #[test]
    fn key_id_is_derived_from_the_key_and_differs_between_keys() {
        let a = key(1);
        let a2 = key(1);
        let b = key(2);
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

    /// The subkey is HKDF-SHA256 as specified in docs/wire-format.md:
    /// recompute it here with ring's HKDF and GCM directly.
    #[test]
    fn seal_is_aes_256_gcm_under_the_documented_hkdf_subkey_and_nonce() {
        let link = [0x0b; KEY_LEN];
        let k = Key::from_bytes(&link).unwrap();
        let session = 0x0123_4567_89ab_cdef_u64;
        let (ct, tag) = seal(&k, session, b"what do ya want for nothing?");

        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"weir frame subkey salt v1\0").extract(&link);
        let id = k.id().0.to_be_bytes();
        let s = session.to_be_bytes();
        let info: [&[u8]; 3] = [b"weir aes-256-gcm session subkey v1\0", &id, &s];
        let mut subkey = [0u8; 32];
        prk.expand(&info, hkdf::HKDF_SHA256)
            .unwrap()
            .fill(&mut subkey)
            .unwrap();
        let gcm =
            aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_256_GCM, &subkey).unwrap());
        let mut nonce = [0u8; 12];
        nonce[7] = 42;
        nonce[9] = 3;
        let mut expected = b"what do ya want for nothing?".to_vec();
        let expected_tag = gcm
            .seal_in_place_separate_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(b"header"),
                &mut expected,
            )
            .unwrap();
        assert_eq!(ct, expected);
        assert_eq!(&tag[..], expected_tag.as_ref());
        assert_ne!(
            &ct[..],
            b"what do ya want for nothing?",
            "the shard is encrypted"
        );
    }

    #[test]
    fn nonces_differ_for_every_field_and_the_control_flag() {
        let ids = [
            FRAME,
            FrameId {
                control: true,
                ..FRAME
            },
            FrameId { block: 43, ..FRAME },
            FrameId { index: 4, ..FRAME },
            FrameId {
                control: false,
                block: 3,
                index: 42,
            },
        ];
        for (i, a) in ids.iter().enumerate() {
            for b in &ids[i + 1..] {
                assert_ne!(a.nonce().as_ref(), b.nonce().as_ref(), "{a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn verifier_refuses_empty_duplicate_and_oversized_key_lists() {
        assert_eq!(Verifier::new(vec![]).unwrap_err(), KeyError::NoKeys);
        assert!(matches!(
            Verifier::new(vec![key(1), key(1)]).unwrap_err(),
            KeyError::DuplicateId { .. }
        ));
        let many: Vec<Key> = (0..=MAX_KEYS as u8).map(key).collect();
        assert!(matches!(
            Verifier::new(many).unwrap_err(),
            KeyError::TooManyKeys { .. }
        ));
    }

    #[test]
    fn verifier_reports_each_failure_reason_and_decrypts_what_passes() {
        let (k1, k2) = (key(1), key(2));
        let mut v = Verifier::new(vec![k1.clone()]).unwrap();
        let plain = b"header and shard";
        let (ct, tag) = seal(&k1, 7, plain);
        let mut buf = ct.clone();
        assert_eq!(
            v.open(k1.id().0, 7, FRAME, b"header", &mut buf, Some(&tag)),
            Ok(())
        );
        assert_eq!(&buf[..], plain);
        let (ct2, tag2) = seal(&k2, 7, plain);
        assert_eq!(
            v.open(
                k2.id().0,
                7,
                FRAME,
                b"header",
                &mut ct2.clone(),
                Some(&tag2)
            ),
            Err(AuthError::UnknownKey(k2.id()))
        );
        let mut flipped = ct.clone();
        flipped[5] ^= 1;
        assert_eq!(
            v.open(k1.id().0, 7, FRAME, b"header", &mut flipped, Some(&tag)),
            Err(AuthError::BadTag(k1.id()))
        );
        assert_eq!(
            v.open(k1.id().0, 7, FRAME, b"headeR", &mut ct.clone(), Some(&tag)),
            Err(AuthError::BadTag(k1.id())),
            "the header is associated data"
        );
        let other_frame = FrameId { index: 4, ..FRAME };
        assert_eq!(
            v.open(
                k1.id().0,
                7,
                other_frame,
                b"header",
                &mut ct.clone(),
                Some(&tag)
            ),
            Err(AuthError::BadTag(k1.id())),
            "the nonce binds the frame's place"
        );
        assert_eq!(
            v.open(0, 7, FRAME, b"header", &mut ct.clone(), None),
            Err(AuthError::Unauthenticated)
        );
        let mut off = Verifier::disabled();
        let mut untouched = plain.to_vec();
        assert_eq!(
            off.open(0, 7, FRAME, b"header", &mut untouched, None),
            Ok(())
        );
        assert_eq!(&untouched[..], plain);
        assert_eq!(
            off.open(k1.id().0, 7, FRAME, b"header", &mut ct.clone(), Some(&tag)),
            Err(AuthError::AuthenticationDisabled)
        );
    }

    #[test]
    fn a_frame_sealed_for_one_session_fails_under_another_session_id() {
        let k = key(1);
        let mut v = Verifier::new(vec![k.clone()]).unwrap();
        let (ct, tag) = seal(&k, 100, b"a shard of session 100");
        assert_eq!(
            v.open(k.id().0, 101, FRAME, b"header", &mut ct.clone(), Some(&tag)),
            Err(AuthError::BadTag(k.id()))
        );
        assert_eq!(
            v.open(k.id().0, 100, FRAME, b"header", &mut ct.clone(), Some(&tag)),
            Ok(())
        );
    }

    /// The receiver derives a session's subkey once, keeps at most
    /// SUBKEY_CACHE of them (least recently used replaced), and never keeps
    /// one that opened nothing: forgeries naming fresh sessions do not
    /// evict the live session's subkey.
    #[test]
    fn subkey_cache_is_bounded_and_forgeries_do_not_evict_the_live_session() {
        let k = key(9);
        let mut v = Verifier::new(vec![k.clone()]).unwrap();
        let open = |v: &mut Verifier, session: u64| {
            let (ct, tag) = seal(&k, session, b"shard");
            v.open(
                k.id().0,
                session,
                FRAME,
                b"header",
                &mut ct.clone(),
                Some(&tag),
            )
        };
        for _ in 0..100 {
            open(&mut v, 1).unwrap();
        }
        assert_eq!(v.subkey_derivations(), 1, "one derivation per session");
        for forged_session in 1000..1100 {
            let mut junk = vec![0u8; 5];
            assert!(v
                .open(
                    k.id().0,
                    forged_session,
                    FRAME,
                    b"header",
                    &mut junk,
                    Some(&[0; TAG_LEN])
                )
                .is_err());
            assert!(v.subkeys.len() <= SUBKEY_CACHE);
        }
        assert_eq!(v.subkeys.len(), 1, "forgeries cached nothing");
        let before = v.subkey_derivations();
        open(&mut v, 1).unwrap();
        assert_eq!(
            v.subkey_derivations(),
            before,
            "the live subkey stayed cached"
        );
        // Genuine sessions beyond the bound replace the least recently used.
        for session in 2..=(SUBKEY_CACHE as u64 + 3) {
            open(&mut v, session).unwrap();
            open(&mut v, 1).unwrap();
            assert!(v.subkeys.len() <= SUBKEY_CACHE);
        }
        assert_eq!(v.subkeys.len(), SUBKEY_CACHE);
        let before = v.subkey_derivations();
        open(&mut v, 1).unwrap();
        assert_eq!(
            v.subkey_derivations(),
            before,
            "the most used subkey is kept"
        );
        open(&mut v, 2).unwrap();
        assert_eq!(v.subkey_derivations(), before + 1, "the oldest was evicted");
    }

    #[test]
    fn a_sender_key_derives_its_session_subkey_once_and_still_seals_other_sessions() {
        let k = key(3);
        let (a, ta) = seal(&k, 5, b"same shard");
        let (b, tb) = seal(&k, 6, b"same shard");
        assert_ne!((a.clone(), ta), (b, tb), "sessions use different subkeys");
        assert_eq!(k.secret.sealing.get().map(|s| s.session), Some(5));
        assert_eq!(
            seal(&k, 5, b"same shard"),
            (a, ta),
            "deterministic per session"
        );
    }
}
