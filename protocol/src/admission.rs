//! Cluster admission: a node proves it holds the cluster secret.
//!
//! The proof is a keyed blake3 MAC over (prover node id, verifier node id) under a key
//! derived from the cluster secret. Both ids are the peers' Noise-authenticated ed25519
//! keys, so a proof cannot be replayed by another peer (it would have to hold the
//! prover's private key to complete the Noise handshake as that node) nor presented to a
//! different verifier.

use serde::{Deserialize, Serialize};

use crate::envelope::{KeyPurpose, RootKey};
use crate::ids::NodeId;

pub const CLUSTER_SECRET_LENGTH_BYTES: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretParseError {
    #[error("cluster secret must be {} hex characters, got {got}", CLUSTER_SECRET_LENGTH_BYTES * 2)]
    WrongLength { got: usize },
    #[error("cluster secret is not hexadecimal")]
    NotHex,
}

/// The shared secret every member of one cluster holds.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterSecret([u8; CLUSTER_SECRET_LENGTH_BYTES]);

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("ClusterSecret(<redacted>)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdmissionProof {
    pub prover: NodeId,
    pub verifier: NodeId,
    pub mac: [u8; 32],
}

impl ClusterSecret {
    pub fn from_bytes(bytes: [u8; CLUSTER_SECRET_LENGTH_BYTES]) -> ClusterSecret {
        ClusterSecret(bytes)
    }

    /// Parses the hex form written by `bdr-node gen-secret` (surrounding whitespace allowed).
    pub fn from_hex(text: &str) -> Result<ClusterSecret, SecretParseError> {
        let text = text.trim();
        if text.len() != CLUSTER_SECRET_LENGTH_BYTES * 2 {
            return Err(SecretParseError::WrongLength { got: text.len() });
        }
        let mut bytes = [0u8; CLUSTER_SECRET_LENGTH_BYTES];
        hex::decode_to_slice(text, &mut bytes).map_err(|_| SecretParseError::NotHex)?;
        Ok(ClusterSecret(bytes))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    fn mac_key(&self) -> [u8; 32] {
        RootKey(self.0).derive(KeyPurpose::ClusterAdmission, 0).bytes
    }

    fn mac(&self, prover: &NodeId, verifier: &NodeId) -> blake3::Hash {
        let mut message = [0u8; 64];
        message[..32].copy_from_slice(prover.as_bytes());
        message[32..].copy_from_slice(verifier.as_bytes());
        blake3::keyed_hash(&self.mac_key(), &message)
    }

    pub fn prove(&self, prover: NodeId, verifier: NodeId) -> AdmissionProof {
        AdmissionProof {
            prover,
            verifier,
            mac: *self.mac(&prover, &verifier).as_bytes(),
        }
    }

    /// Whether `proof` shows that `authenticated_prover` (the peer's Noise identity) holds
    /// this secret and addressed the proof to `verifier` (us).
    pub fn verify(&self, proof: &AdmissionProof, authenticated_prover: &NodeId, verifier: &NodeId) -> bool {
        // blake3::Hash equality is constant-time.
        proof.prover == *authenticated_prover
            && proof.verifier == *verifier
            && self.mac(authenticated_prover, verifier) == blake3::Hash::from(proof.mac)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_verify_only_for_the_right_secret_prover_and_verifier() {
        let secret = ClusterSecret::from_bytes([1; 32]);
        let (alice, bob, mallory) = (NodeId([1; 32]), NodeId([2; 32]), NodeId([3; 32]));
        let proof = secret.prove(alice, bob);
        assert!(secret.verify(&proof, &alice, &bob));
        assert!(!secret.verify(&proof, &mallory, &bob), "replayed by another peer");
        assert!(
            !secret.verify(&proof, &alice, &mallory),
            "presented to another verifier"
        );
        assert!(
            !ClusterSecret::from_bytes([2; 32]).verify(&proof, &alice, &bob),
            "other cluster"
        );
        let forged = ClusterSecret::from_bytes([9; 32]).prove(mallory, bob);
        assert!(!secret.verify(&forged, &mallory, &bob));
    }

    #[test]
    fn hex_form_round_trips_and_bad_text_is_refused() {
        let secret = ClusterSecret::from_bytes([0xab; 32]);
        assert_eq!(
            ClusterSecret::from_hex(&format!("  {}\n", secret.to_hex())).unwrap(),
            secret
        );
        assert_eq!(
            ClusterSecret::from_hex("abcd"),
            Err(SecretParseError::WrongLength { got: 4 })
        );
        assert_eq!(ClusterSecret::from_hex(&"g".repeat(64)), Err(SecretParseError::NotHex));
    }
}
