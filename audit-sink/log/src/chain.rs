//! Tamper evidence over the audit log (DESIGN.md §6).
//!
//! - Every record carries `prev_hash`: the SHA-256 of its predecessor's
//!   line exactly as written, so changing, inserting or removing a record
//!   breaks the chain at the next one.
//! - Every line is also a leaf of an RFC 6962 Merkle tree, and signed
//!   checkpoints (C2SP `tlog-checkpoint` in a signed note, Ed25519) commit
//!   to the tree's size and root, so a cut-off tail or an altered last
//!   record is caught too, and a third party can check them.

use base64::Engine;
use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

/// `prev_hash` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The chain hash of a written line (without its newline), hex.
pub fn line_hash(line: &str) -> String {
    hex::encode(Sha256::digest(line.as_bytes()))
}

/// RFC 6962 leaf hash: SHA-256(0x00 || line).
pub fn leaf_hash(line: &str) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(line.as_bytes());
    h.finalize().into()
}

fn node_hash(l: &Hash, r: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(l);
    h.update(r);
    h.finalize().into()
}

/// RFC 6962 Merkle tree hash of `leaves` (the empty tree is SHA-256("")).
pub fn merkle_root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => Sha256::digest([]).into(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&merkle_root(&leaves[..k]), &merkle_root(&leaves[k..]))
        }
    }
}

/// The largest power of two smaller than `n` (n ≥ 2).
fn split(n: usize) -> usize {
    let mut k = 1;
    while k * 2 < n {
        k *= 2;
    }
    k
}

/// Merkle root kept up to date as leaves are appended, in O(log n) memory:
/// the roots of the perfect subtrees the leaves so far decompose into.
#[derive(Debug, Clone, Default)]
pub struct MerkleAccumulator {
    size: u64,
    /// (subtree size, root), largest first.
    stack: Vec<(u64, Hash)>,
}

impl MerkleAccumulator {
    pub fn push(&mut self, leaf: Hash) {
        let mut node = (1u64, leaf);
        while let Some(&(size, h)) = self.stack.last() {
            if size != node.0 {
                break;
            }
            self.stack.pop();
            node = (size * 2, node_hash(&h, &node.1));
        }
        self.stack.push(node);
        self.size += 1;
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The tree hash of every leaf pushed so far.
    pub fn root(&self) -> Hash {
        let mut it = self.stack.iter().rev();
        match it.next() {
            None => Sha256::digest([]).into(),
            Some(&(_, first)) => it.fold(first, |acc, (_, h)| node_hash(h, &acc)),
        }
    }
}

/// RFC 6962 inclusion proof of leaf `index` in the tree of `leaves`.
pub fn inclusion_proof(leaves: &[Hash], index: usize) -> Vec<Hash> {
    if leaves.len() <= 1 {
        return Vec::new();
    }
    let k = split(leaves.len());
    if index < k {
        let mut p = inclusion_proof(&leaves[..k], index);
        p.push(merkle_root(&leaves[k..]));
        p
    } else {
        let mut p = inclusion_proof(&leaves[k..], index - k);
        p.push(merkle_root(&leaves[..k]));
        p
    }
}

/// Check an inclusion proof (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(leaf: Hash, index: u64, size: u64, proof: &[Hash], root: Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut fnode, mut snode) = (index, size - 1);
    let mut r = leaf;
    for p in proof {
        if snode == 0 {
            return false;
        }
        if fnode % 2 == 1 || fnode == snode {
            r = node_hash(p, &r);
            if fnode % 2 == 0 {
                while fnode % 2 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && r == root
}

/// RFC 6962 consistency proof that the tree of the first `m` leaves is a
/// prefix of the tree of all `leaves` (RFC 9162 §2.1.4.1). Empty when
/// `m == 0` or `m == leaves.len()`.
pub fn consistency_proof(leaves: &[Hash], m: usize) -> Vec<Hash> {
    fn sub(leaves: &[Hash], m: usize, complete: bool, out: &mut Vec<Hash>) {
        let n = leaves.len();
        if m == n {
            if !complete {
                out.push(merkle_root(leaves));
            }
            return;
        }
        let k = split(n);
        if m <= k {
            sub(&leaves[..k], m, complete, out);
            out.push(merkle_root(&leaves[k..]));
        } else {
            sub(&leaves[k..], m - k, false, out);
            out.push(merkle_root(&leaves[..k]));
        }
    }
    let mut out = Vec::new();
    if m > 0 && m < leaves.len() {
        sub(leaves, m, true, &mut out);
    }
    out
}

/// Check a consistency proof between a tree of `first` leaves with root
/// `first_root` and one of `second` leaves with root `second_root`
/// (RFC 9162 §2.1.4.2).
pub fn verify_consistency(
    first: u64,
    second: u64,
    first_root: Hash,
    second_root: Hash,
    proof: &[Hash],
) -> bool {
    if first > second {
        return false;
    }
    if first == second {
        return proof.is_empty() && first_root == second_root;
    }
    if first == 0 {
        // The empty tree is a prefix of every tree.
        return proof.is_empty();
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if first.is_power_of_two() {
        path.push(first_root);
    }
    path.extend_from_slice(proof);
    let Some((&c0, rest)) = path.split_first() else {
        return false;
    };
    let (mut fnode, mut snode) = (first - 1, second - 1);
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    let (mut fr, mut sr) = (c0, c0);
    for c in rest {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && fr == first_root && sr == second_root
}

/// A checkpoint: the log named `origin` had `size` records with tree root
/// `root`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoteError {
    #[error("not a signed checkpoint note")]
    Malformed,
    #[error("no signature by key {0:?}")]
    NoSignature(String),
    #[error("the signature does not verify")]
    BadSignature,
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// The C2SP signed-note key id: the first 4 bytes of
/// SHA-256(name || "\n" || 0x01 || public key) for Ed25519.
fn key_id(name: &str, key: &VerifyingKey) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([0x01]);
    h.update(key.as_bytes());
    let d = h.finalize();
    [d[0], d[1], d[2], d[3]]
}

impl Checkpoint {
    /// The checkpoint body (C2SP tlog-checkpoint).
    pub fn body(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            b64().encode(self.root)
        )
    }

    /// A signed note: the body, a blank line, one signature line.
    pub fn sign(&self, key_name: &str, key: &SigningKey) -> String {
        let body = self.body();
        let sig = key.sign(body.as_bytes());
        let mut blob = key_id(key_name, &key.verifying_key()).to_vec();
        blob.extend_from_slice(&sig.to_bytes());
        format!("{body}\n\u{2014} {key_name} {}\n", b64().encode(blob))
    }

    /// Parse a signed note and check its signature by `key_name`/`key`.
    pub fn verify(note: &str, key_name: &str, key: &VerifyingKey) -> Result<Checkpoint, NoteError> {
        let (body, sigs) = note.split_once("\n\n").ok_or(NoteError::Malformed)?;
        let body = format!("{body}\n");
        let mut lines = body.lines();
        let (Some(origin), Some(size), Some(root), None) =
            (lines.next(), lines.next(), lines.next(), lines.next())
        else {
            return Err(NoteError::Malformed);
        };
        let size: u64 = size.parse().map_err(|_| NoteError::Malformed)?;
        let root: Hash = b64()
            .decode(root)
            .ok()
            .and_then(|r| r.try_into().ok())
            .ok_or(NoteError::Malformed)?;
        let id = key_id(key_name, key);
        let prefix = format!("\u{2014} {key_name} ");
        let blob = sigs
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .filter_map(|s| b64().decode(s).ok())
            .find(|b| b.len() == 68 && b[..4] == id)
            .ok_or_else(|| NoteError::NoSignature(key_name.to_string()))?;
        let sig = ed25519_dalek::Signature::from_slice(&blob[4..])
            .map_err(|_| NoteError::BadSignature)?;
        key.verify(body.as_bytes(), &sig)
            .map_err(|_| NoteError::BadSignature)?;
        Ok(Checkpoint {
            origin: origin.to_string(),
            size,
            root,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n).map(|i| leaf_hash(&format!("record {i}"))).collect()
    }

    #[test]
    fn accumulator_matches_the_recursive_definition() {
        let all = leaves(37);
        let mut acc = MerkleAccumulator::default();
        for (i, l) in all.iter().enumerate() {
            acc.push(*l);
            assert_eq!(acc.root(), merkle_root(&all[..=i]), "size {}", i + 1);
        }
        assert_eq!(acc.size(), 37);
    }

    #[test]
    fn inclusion_proofs_verify_and_reject_the_wrong_leaf() {
        for n in [1usize, 2, 3, 7, 8, 13] {
            let all = leaves(n);
            let root = merkle_root(&all);
            for i in 0..n {
                let p = inclusion_proof(&all, i);
                assert!(
                    verify_inclusion(all[i], i as u64, n as u64, &p, root),
                    "n={n} i={i}"
                );
                let wrong = leaf_hash("forged");
                assert!(!verify_inclusion(wrong, i as u64, n as u64, &p, root));
            }
        }
    }

    #[test]
    fn consistency_proofs_verify_for_every_prefix_and_reject_forgeries() {
        for n in 1..=40usize {
            let all = leaves(n);
            let second = merkle_root(&all);
            for m in 0..=n {
                let first = merkle_root(&all[..m]);
                let proof = consistency_proof(&all, m);
                assert!(
                    verify_consistency(m as u64, n as u64, first, second, &proof),
                    "m={m} n={n}"
                );
                if m == 0 || m == n {
                    continue;
                }
                // A different older tree (its last leaf changed) is not a prefix.
                let mut other = all[..m].to_vec();
                other[m - 1][0] ^= 1;
                assert!(
                    !verify_consistency(m as u64, n as u64, merkle_root(&other), second, &proof),
                    "forged first root accepted m={m} n={n}"
                );
                // A tampered proof fails. (Sizes are bound by the signed
                // checkpoints, not by the proof.)
                let mut bad = proof.clone();
                if let Some(h) = bad.first_mut() {
                    h[5] ^= 0x80;
                    assert!(!verify_consistency(m as u64, n as u64, first, second, &bad));
                }
            }
        }
    }

    #[test]
    fn signed_notes_verify_and_detect_changes() {
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let cp = Checkpoint {
            origin: "clawgress/audit".into(),
            size: 10,
            root: merkle_root(&leaves(10)),
        };
        let note = cp.sign("clawgress-audit", &key);
        assert!(note.starts_with("clawgress/audit\n10\n"));
        assert!(note.contains("\n\n\u{2014} clawgress-audit "));
        assert_eq!(
            Checkpoint::verify(&note, "clawgress-audit", &key.verifying_key()),
            Ok(cp)
        );
        let forged = note.replacen("\n10\n", "\n11\n", 1);
        assert_eq!(
            Checkpoint::verify(&forged, "clawgress-audit", &key.verifying_key()),
            Err(NoteError::BadSignature)
        );
        let other = SigningKey::from_bytes(&[8u8; 32]);
        assert!(Checkpoint::verify(&note, "clawgress-audit", &other.verifying_key()).is_err());
    }
}
