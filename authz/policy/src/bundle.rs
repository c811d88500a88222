//! The signed policy bundle (DESIGN.md §7, §10): a committed revision of the
//! policy document, serialised canonically and signed with the control
//! plane's Ed25519 key.
//!
//! On disk a bundle is one JSON object:
//!
//! ```json
//! {"format":"clawgress-bundle/1","revision":7,"issued_at":"2026-11-23T12:00:00Z",
//!  "document":"{…canonical JSON of the policy document…}","signature":"<128 hex>"}
//! ```
//!
//! The document travels as a string so the signature covers its exact bytes:
//! a reader checks the signature over those bytes *before* it parses them,
//! and never has to re-serialise anything to check it.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::config::{ConfigErrors, PolicyDocument};

/// The format tag; a bundle of any other format is refused.
pub const FORMAT: &str = "clawgress-bundle/1";

/// Bundles larger than this are refused before parsing.
pub const MAX_BUNDLE_BYTES: usize = 64 * 1024 * 1024;

/// A verified bundle.
#[derive(Debug, Clone, PartialEq)]
pub struct Bundle {
    pub revision: u64,
    pub issued_at: String,
    pub document: PolicyDocument,
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("the bundle is larger than {MAX_BUNDLE_BYTES} bytes")]
    TooLarge,
    #[error("not a bundle: {0}")]
    Malformed(String),
    #[error("unknown bundle format {0:?} (expected {FORMAT:?})")]
    Format(String),
    #[error("the bundle is not signed")]
    Unsigned,
    #[error(
        "bad signature: the bundle was not signed by the pinned control-plane key, or was altered"
    )]
    BadSignature,
    #[error("the signed document is invalid: {0}")]
    Invalid(ConfigErrors),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    format: String,
    revision: u64,
    issued_at: String,
    document: String,
    #[serde(default)]
    signature: String,
}

/// The bytes the signature covers: format, revision, time and document,
/// each on its own line, so no field can be moved into another.
fn signed_message(format: &str, revision: u64, issued_at: &str, document: &str) -> Vec<u8> {
    format!("{format}\n{revision}\n{issued_at}\n{document}").into_bytes()
}

impl Bundle {
    /// Serialise and sign `document` as `revision`. `issued_at` is an
    /// RFC 3339 time (the caller's clock; this crate reads none).
    pub fn sign(
        document: &PolicyDocument,
        revision: u64,
        issued_at: &str,
        key: &SigningKey,
    ) -> String {
        let doc = document.to_canonical_json();
        let sig = key.sign(&signed_message(FORMAT, revision, issued_at, &doc));
        let wire = Wire {
            format: FORMAT.into(),
            revision,
            issued_at: issued_at.into(),
            document: doc,
            signature: hex::encode(sig.to_bytes()),
        };
        // Serialising strings and integers cannot fail.
        serde_json::to_string(&wire).unwrap_or_default() + "\n"
    }

    /// Check the signature against the pinned key, then parse and validate
    /// the document.
    pub fn verify(bytes: &[u8], key: &VerifyingKey) -> Result<Bundle, BundleError> {
        if bytes.len() > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge);
        }
        let wire: Wire =
            serde_json::from_slice(bytes).map_err(|e| BundleError::Malformed(e.to_string()))?;
        if wire.format != FORMAT {
            return Err(BundleError::Format(wire.format));
        }
        if wire.signature.is_empty() {
            return Err(BundleError::Unsigned);
        }
        let mut sig = [0u8; 64];
        hex::decode_to_slice(wire.signature.trim(), &mut sig)
            .map_err(|_| BundleError::BadSignature)?;
        key.verify_strict(
            &signed_message(&wire.format, wire.revision, &wire.issued_at, &wire.document),
            &Signature::from_bytes(&sig),
        )
        .map_err(|_| BundleError::BadSignature)?;
        let document = PolicyDocument::from_json(&wire.document).map_err(BundleError::Invalid)?;
        Ok(Bundle {
            revision: wire.revision,
            issued_at: wire.issued_at,
            document,
        })
    }
}

/// Parse a public key written as 64 hex digits (the `*.pub` files).
pub fn verifying_key_from_hex(text: &str) -> Result<VerifyingKey, String> {
    let mut b = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut b)
        .map_err(|_| "not a 64-hex-digit Ed25519 public key".to_string())?;
    VerifyingKey::from_bytes(&b).map_err(|_| "not a valid Ed25519 public key".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> PolicyDocument {
        PolicyDocument::from_json(
            r#"{"policies":[{"policy_id":"allow-pypi","priority":100,
                "match":{"destination":{"hosts":["pypi.org"]}},"action":"allow"}]}"#,
        )
        .expect("valid")
    }

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    #[test]
    fn a_signed_bundle_verifies_and_carries_its_document() {
        let text = Bundle::sign(&doc(), 7, "2026-11-23T12:00:00Z", &key(1));
        let b = Bundle::verify(text.as_bytes(), &key(1).verifying_key()).expect("verifies");
        assert_eq!(b.revision, 7);
        assert_eq!(b.issued_at, "2026-11-23T12:00:00Z");
        assert_eq!(b.document, doc());
    }

    #[test]
    fn another_key_is_refused() {
        let text = Bundle::sign(&doc(), 7, "t", &key(1));
        assert!(matches!(
            Bundle::verify(text.as_bytes(), &key(2).verifying_key()),
            Err(BundleError::BadSignature)
        ));
    }

    #[test]
    fn any_altered_field_breaks_the_signature() {
        let text = Bundle::sign(&doc(), 7, "t", &key(1));
        let vk = key(1).verifying_key();
        for (from, to) in [
            ("pypi.org", "evil.org"),
            ("\"revision\":7", "\"revision\":8"),
            ("\"issued_at\":\"t\"", "\"issued_at\":\"u\""),
            ("\"priority\\\":100", "\"priority\\\":1"),
        ] {
            assert!(text.contains(from), "{from} in {text}");
            let bad = text.replace(from, to);
            assert!(
                matches!(
                    Bundle::verify(bad.as_bytes(), &vk),
                    Err(BundleError::BadSignature)
                ),
                "{from} -> {to}"
            );
        }
    }

    #[test]
    fn unsigned_malformed_and_foreign_bundles_are_refused() {
        let vk = key(1).verifying_key();
        let text = Bundle::sign(&doc(), 7, "t", &key(1));
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        let mut unsigned = v.clone();
        unsigned["signature"] = "".into();
        assert!(matches!(
            Bundle::verify(unsigned.to_string().as_bytes(), &vk),
            Err(BundleError::Unsigned)
        ));
        let mut foreign = v.clone();
        foreign["format"] = "other/1".into();
        assert!(matches!(
            Bundle::verify(foreign.to_string().as_bytes(), &vk),
            Err(BundleError::Format(_))
        ));
        for junk in [&b""[..], b"{", b"null", b"[]", b"\xff\xfe"] {
            assert!(matches!(
                Bundle::verify(junk, &vk),
                Err(BundleError::Malformed(_))
            ));
        }
        let mut badsig = v;
        badsig["signature"] = "zz".into();
        assert!(matches!(
            Bundle::verify(badsig.to_string().as_bytes(), &vk),
            Err(BundleError::BadSignature)
        ));
    }

    #[test]
    fn a_signed_but_invalid_document_is_refused() {
        // Signed by the right key, but the document breaks a rule: the
        // signer's mistake must not become enforcement.
        let k = key(1);
        let doc = r#"{"policies":[{"policy_id":"x","priority":1,"match":{},"action":"maybe"}]}"#;
        let sig = k.sign(&signed_message(FORMAT, 1, "t", doc));
        let wire = Wire {
            format: FORMAT.into(),
            revision: 1,
            issued_at: "t".into(),
            document: doc.into(),
            signature: hex::encode(sig.to_bytes()),
        };
        let text = serde_json::to_string(&wire).expect("json");
        assert!(matches!(
            Bundle::verify(text.as_bytes(), &k.verifying_key()),
            Err(BundleError::Invalid(_))
        ));
    }
}
