//! The node's ed25519 identity: its libp2p `PeerId` and its protocol `NodeId`.
//!
//! Stored in `<data_dir>/node.key` as two text lines, a format tag and the 32 secret
//! bytes in hex, created with mode 0600 and never overwritten.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use bdr_protocol::ids::NodeId;
use libp2p::identity::{ed25519, Keypair, PublicKey};
use libp2p::PeerId;

pub const KEY_FILE_NAME: &str = "node.key";
const KEY_FILE_FORMAT: &str = "bdr-node-key-v1";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot {action} {path}: {reason}")]
    Io {
        action: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{path} is not a bdr node key: {reason}")]
    Malformed { path: PathBuf, reason: String },
}

pub struct NodeIdentity {
    pub keypair: Keypair,
    pub node_id: NodeId,
    pub peer_id: PeerId,
}

impl NodeIdentity {
    fn from_secret(secret: [u8; 32]) -> NodeIdentity {
        // ed25519_from_bytes zeroizes its argument; `secret` is our own copy.
        let keypair = Keypair::ed25519_from_bytes(secret).expect("32 bytes are a valid ed25519 secret");
        let public = keypair
            .public()
            .try_into_ed25519()
            .expect("an ed25519 keypair has an ed25519 public key");
        NodeIdentity {
            node_id: NodeId(public.to_bytes()),
            peer_id: keypair.public().to_peer_id(),
            keypair,
        }
    }

    /// Loads the identity in `data_dir`, creating it if there is none. Returns whether it
    /// was created.
    pub fn load_or_create(data_dir: &Path) -> Result<(NodeIdentity, bool), IdentityError> {
        let path = data_dir.join(KEY_FILE_NAME);
        if path.exists() {
            return Ok((NodeIdentity::load(&path)?, false));
        }
        let io = |action, error: std::io::Error| IdentityError::Io {
            action,
            path: path.clone(),
            reason: error.to_string(),
        };
        fs::create_dir_all(data_dir).map_err(|error| io("create the folder of", error))?;
        let secret: [u8; 32] = rand::random();
        let text = format!("{KEY_FILE_FORMAT}\n{}\n", hex::encode(secret));
        // create_new: if another process won the race, we fail rather than overwrite.
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|error| io("create", error))?;
        file.write_all(text.as_bytes()).map_err(|error| io("write", error))?;
        file.sync_all().map_err(|error| io("fsync", error))?;
        Ok((NodeIdentity::from_secret(secret), true))
    }

    pub fn load(path: &Path) -> Result<NodeIdentity, IdentityError> {
        let text = fs::read_to_string(path).map_err(|error| IdentityError::Io {
            action: "read",
            path: path.to_path_buf(),
            reason: error.to_string(),
        })?;
        let malformed = |reason: &str| IdentityError::Malformed {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        let mut lines = text.lines();
        if lines.next() != Some(KEY_FILE_FORMAT) {
            return Err(malformed("missing the format line"));
        }
        let mut secret = [0u8; 32];
        hex::decode_to_slice(lines.next().unwrap_or("").trim(), &mut secret)
            .map_err(|_| malformed("the key line is not 64 hex characters"))?;
        Ok(NodeIdentity::from_secret(secret))
    }
}

/// The protocol node id of a libp2p peer, if it is an ed25519 peer (all bdr nodes are).
pub fn node_id_of_peer(peer: &PeerId) -> Option<NodeId> {
    let multihash = peer.as_ref();
    // Ed25519 peer ids are identity multihashes (code 0) of the protobuf public key.
    if multihash.code() != 0 {
        return None;
    }
    let public = PublicKey::try_decode_protobuf(multihash.digest()).ok()?;
    Some(NodeId(public.try_into_ed25519().ok()?.to_bytes()))
}

/// The libp2p peer id of a node id.
pub fn peer_of_node_id(node: &NodeId) -> Option<PeerId> {
    let public = ed25519::PublicKey::try_from_bytes(node.as_bytes()).ok()?;
    Some(PublicKey::from(public).to_peer_id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn identity_is_created_once_with_private_permissions_and_reloaded() {
        let directory = tempfile::tempdir().unwrap();
        let (first, created) = NodeIdentity::load_or_create(directory.path()).unwrap();
        assert!(created);
        let mode = fs::metadata(directory.path().join(KEY_FILE_NAME))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (second, created_again) = NodeIdentity::load_or_create(directory.path()).unwrap();
        assert!(!created_again);
        assert_eq!(first.node_id, second.node_id);
        assert_eq!(first.peer_id, second.peer_id);
    }

    #[test]
    fn peer_ids_and_node_ids_convert_both_ways() {
        let directory = tempfile::tempdir().unwrap();
        let (identity, _) = NodeIdentity::load_or_create(directory.path()).unwrap();
        assert_eq!(node_id_of_peer(&identity.peer_id), Some(identity.node_id));
        assert_eq!(peer_of_node_id(&identity.node_id), Some(identity.peer_id));
    }

    #[test]
    fn a_damaged_key_file_is_a_clear_error() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join(KEY_FILE_NAME);
        fs::write(&path, "something else\n").unwrap();
        assert!(matches!(
            NodeIdentity::load(&path),
            Err(IdentityError::Malformed { .. })
        ));
        fs::write(&path, format!("{KEY_FILE_FORMAT}\nnothex\n")).unwrap();
        assert!(matches!(
            NodeIdentity::load(&path),
            Err(IdentityError::Malformed { .. })
        ));
    }
}
