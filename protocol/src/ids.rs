//! Identifiers: content ids (stripes, chunks), node ids and zone names.
//!
//! All ids are fixed-size byte arrays on disk and on the wire, shown as lowercase hex.
//! Node ids are the raw 32-byte ed25519 public key of the node: the protocol crate knows
//! nothing about libp2p, the node crate converts to and from `PeerId`.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Length in bytes of every hash-based id and of node ids.
pub const ID_LENGTH_BYTES: usize = 32;

/// Longest zone name accepted. Zone names appear in configs, logs and the dashboard.
pub const ZONE_NAME_LENGTH_BYTES_MAX: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdParseError {
    #[error("expected {expected} hex characters, got {got}")]
    WrongLength { expected: usize, got: usize },
    #[error("not hexadecimal: {0}")]
    NotHex(String),
    #[error("zone name must be 1..={ZONE_NAME_LENGTH_BYTES_MAX} bytes of [a-z0-9._-], got {0:?}")]
    BadZoneName(String),
}

fn parse_hex_id(text: &str) -> Result<[u8; ID_LENGTH_BYTES], IdParseError> {
    if text.len() != ID_LENGTH_BYTES * 2 {
        return Err(IdParseError::WrongLength {
            expected: ID_LENGTH_BYTES * 2,
            got: text.len(),
        });
    }
    let mut bytes = [0u8; ID_LENGTH_BYTES];
    hex::decode_to_slice(text, &mut bytes).map_err(|error| IdParseError::NotHex(error.to_string()))?;
    Ok(bytes)
}

/// The id's bytes as big-endian words, which compare as the bytes do.
#[inline]
fn ordered_words(bytes: &[u8; ID_LENGTH_BYTES]) -> [u64; 4] {
    let word = |index: usize| u64::from_be_bytes(bytes[index * 8..index * 8 + 8].try_into().expect("8 bytes"));
    [word(0), word(1), word(2), word(3)]
}

macro_rules! hex_id {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub struct $name(pub [u8; ID_LENGTH_BYTES]);

        // Byte order (as derived), compared as four big-endian words: the derived order
        // calls memcmp for each comparison, which was a tenth of the simulator's time
        // (ids key the membership's and maintenance's maps).
        impl Ord for $name {
            #[inline]
            fn cmp(&self, other: &Self) -> std::cmp::Ordering {
                ordered_words(&self.0).cmp(&ordered_words(&other.0))
            }
        }

        impl PartialOrd for $name {
            #[inline]
            fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(other))
            }
        }

        impl $name {
            pub const fn from_bytes(bytes: [u8; ID_LENGTH_BYTES]) -> Self {
                Self(bytes)
            }
            pub const fn as_bytes(&self) -> &[u8; ID_LENGTH_BYTES] {
                &self.0
            }
            /// First 8 hex characters: enough to tell ids apart in logs and tables.
            pub fn short(&self) -> String {
                hex::encode(&self.0[..4])
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str(&hex::encode(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(formatter, "{}({})", stringify!($name), self.short())
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;
            fn from_str(text: &str) -> Result<Self, Self::Err> {
                parse_hex_id(text).map(Self)
            }
        }
    };
}

hex_id!(
    /// Identifies one stripe of one write: a keyed blake3 of the seal nonce and plaintext
    /// (see [`StripeId::for_sealed_write`]), revealing nothing about the content.
    StripeId
);
hex_id!(
    /// Identifies one content-defined chunk written by `bdr-client`.
    ChunkId
);
hex_id!(
    /// A node: the 32 bytes of its ed25519 public key.
    NodeId
);

impl StripeId {
    /// The stripe id of `plaintext` under `id_key` (a key derived from the key ring, so
    /// that storage nodes cannot confirm guesses about content by hashing it themselves).
    pub fn for_plaintext(id_key: &[u8; 32], plaintext: &[u8]) -> Self {
        Self(*blake3::keyed_hash(id_key, plaintext).as_bytes())
    }

    /// The stripe id of one write of `plaintext` sealed with `nonce`. Every write gets its
    /// own id (the nonce is random), so a stripe belongs to exactly one object version or
    /// part: shards of two writes of equal content never mix under one name, and garbage
    /// collection needs no reference counts. Readers recompute it from the opened
    /// envelope's nonce and plaintext, an end-to-end check on top of the AEAD.
    pub fn for_sealed_write(id_key: &[u8; 32], nonce: &[u8; 24], plaintext: &[u8]) -> Self {
        let mut hasher = blake3::Hasher::new_keyed(id_key);
        hasher.update(b"bdr stripe v2");
        hasher.update(nonce);
        hasher.update(plaintext);
        Self(*hasher.finalize().as_bytes())
    }
}

/// The name of a zone (a site: an office, a cloud region). Validated on construction:
/// 1..=64 bytes of lowercase ASCII letters, digits, '.', '_' and '-'.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ZoneName(String);

impl ZoneName {
    pub fn new(name: impl Into<String>) -> Result<Self, IdParseError> {
        let name = name.into();
        let valid_length = !name.is_empty() && name.len() <= ZONE_NAME_LENGTH_BYTES_MAX;
        let valid_characters = name
            .bytes()
            .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || b"._-".contains(&byte));
        if !(valid_length && valid_characters) {
            return Err(IdParseError::BadZoneName(name));
        }
        Ok(Self(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for ZoneName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        ZoneName::new(name).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for ZoneName {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

impl fmt::Debug for ZoneName {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "ZoneName({})", self.0)
    }
}

impl FromStr for ZoneName {
    type Err = IdParseError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        ZoneName::new(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn hex_ids_round_trip_through_display(bytes in any::<[u8; 32]>()) {
            let id = StripeId(bytes);
            prop_assert_eq!(id.to_string().parse::<StripeId>().unwrap(), id);
            let node = NodeId(bytes);
            prop_assert_eq!(node.to_string().parse::<NodeId>().unwrap(), node);
        }

        /// Maps, placement tie-breaks and listings depend on the order: it must stay the
        /// bytes' order. Ids that share a prefix are drawn too, so later words decide.
        #[test]
        fn ids_order_as_their_bytes(
            first in any::<[u8; 32]>(),
            second in any::<[u8; 32]>(),
            shared_bytes in 0usize..=32,
        ) {
            let mut second = second;
            second[..shared_bytes].copy_from_slice(&first[..shared_bytes]);
            prop_assert_eq!(NodeId(first).cmp(&NodeId(second)), first.cmp(&second));
            prop_assert_eq!(StripeId(first).partial_cmp(&StripeId(second)), Some(first.cmp(&second)));
        }

        #[test]
        fn parsing_arbitrary_text_never_panics(text in ".{0,80}") {
            let _ = text.parse::<NodeId>();
            let _ = text.parse::<ZoneName>();
        }
    }

    #[test]
    fn bad_ids_are_refused_with_a_reason() {
        assert_eq!(
            "abc".parse::<NodeId>().unwrap_err(),
            IdParseError::WrongLength { expected: 64, got: 3 }
        );
        assert!(matches!(
            "zz".repeat(32).parse::<NodeId>(),
            Err(IdParseError::NotHex(_))
        ));
    }

    #[test]
    fn zone_names_are_validated() {
        for good in ["a", "eu-west-1", "office.berlin", "z_9"] {
            assert!(ZoneName::new(good).is_ok(), "{good}");
        }
        for bad in ["", "Upper", "has space", "ü", &"x".repeat(65)] {
            assert!(ZoneName::new(bad).is_err(), "{bad}");
        }
        let decoded: Result<ZoneName, _> = serde_json::from_str("\"BAD ZONE\"");
        assert!(decoded.is_err());
    }

    #[test]
    fn stripe_ids_depend_on_key_and_content() {
        let a = StripeId::for_plaintext(&[1; 32], b"hello");
        assert_eq!(a, StripeId::for_plaintext(&[1; 32], b"hello"));
        assert_ne!(a, StripeId::for_plaintext(&[2; 32], b"hello"));
        assert_ne!(a, StripeId::for_plaintext(&[1; 32], b"hellp"));
    }

    #[test]
    fn every_write_of_equal_content_gets_its_own_stripe_id() {
        let a = StripeId::for_sealed_write(&[1; 32], &[7; 24], b"hello");
        assert_eq!(a, StripeId::for_sealed_write(&[1; 32], &[7; 24], b"hello"));
        assert_ne!(a, StripeId::for_sealed_write(&[1; 32], &[8; 24], b"hello"));
        assert_ne!(a, StripeId::for_sealed_write(&[2; 32], &[7; 24], b"hello"));
        assert_ne!(a, StripeId::for_plaintext(&[1; 32], b"hello"));
    }
}
