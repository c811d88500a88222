//! The bearer-token verifier (RFC 8725 rules, DESIGN §3) against an issuer
//! with an HS256 secret and an Ed25519 JWKS: never a panic, and nothing
//! the fuzzer writes verifies — neither arbitrary text nor a token of three
//! parts built from the fuzzer's own header and payload JSON, which it
//! cannot sign with keys it does not have.
#![no_main]

use std::sync::LazyLock;

use base64::Engine;
use clawgress_authz::jwt::JwtVerifier;
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "fuzz-secret-0123456789abcdef-0123456789";
/// An Ed25519 public key (RFC 8037 test vector A.2's `x`).
const JWKS: &str = r#"{"keys": [{"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "kid": "ed",
  "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
  {"kty": "oct", "k": "c2VjcmV0", "kid": "oct", "alg": "HS256"}]}"#;

static VERIFIER: LazyLock<JwtVerifier> = LazyLock::new(|| {
    let dir = std::env::temp_dir().join(format!("clawgress-fuzz-jwt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("hs"), SECRET).expect("secret");
    std::fs::write(dir.join("jwks.json"), JWKS).expect("jwks");
    let issuer = serde_json::from_value(serde_json::json!({
        "issuer": "https://idp.fuzz",
        "audiences": ["clawgress"],
        "jwks_file": dir.join("jwks.json"),
        "hs256_secret_file": dir.join("hs"),
    }))
    .expect("issuer config");
    JwtVerifier::load(&[issuer]).expect("verifier")
});

const NOW: u64 = 1_800_000_000;

fuzz_target!(|data: &[u8]| {
    let v = &*VERIFIER;
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(c) = v.verify(s, NOW) {
            panic!("{s:?} verified as {c:?}");
        }
    }
    // Header and payload from the input (split at the first 0xff), with a
    // signature of the input's bytes: well-formed tokens, never valid.
    let mut parts = data.splitn(3, |b| *b == 0xff);
    let header = parts.next().unwrap_or_default();
    let payload = parts.next().unwrap_or_default();
    let sig = parts.next().unwrap_or_default();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let token = format!("{}.{}.{}", b64(header), b64(payload), b64(sig));
    if let Ok(c) = v.verify(&token, NOW) {
        panic!("{token:?} verified as {c:?}");
    }
});
