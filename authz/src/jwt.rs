//! Bearer JWTs (`Proxy-Authorization: Bearer <JWT>`), verified the way
//! RFC 8725 asks (DESIGN.md §3):
//!
//! - keys come only from the issuer's configured JWKS file or HS256 secret
//!   file; `jku`, `x5u`, `jwk`, `x5c` in a token are never used, and `kid`
//!   only picks among the configured keys;
//! - each key's algorithm is fixed when it is loaded (from its JWKS `alg`, or
//!   its key type), and a token's `alg` must equal it: no `none`, no RS/HS
//!   confusion; JWKS `oct` keys are ignored (HS256 needs the issuer's own
//!   secret file), and so are keys published for anything but verifying
//!   (`use` not `sig`, `key_ops` without `verify`); RSA keys under 2048
//!   bits are refused at load;
//! - `exp` is required (per issuer), `nbf`/`exp`/`iat` are checked with a
//!   bounded skew; `typ`, if present, is `JWT` or `at+jwt`; any `crit` header
//!   is refused; tokens over 8 KiB are refused before anything is parsed.

use std::collections::HashSet;
use std::path::Path;

use base64::Engine;
use clawgress_policy::config::{ClaimNames, JwtIssuer, Name};
use clawgress_policy::TokenFailure;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm};
use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, Validation};

/// Largest token looked at (§3).
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// The verified identity claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub agent_id: String,
    pub team_id: String,
    pub project_id: String,
    pub environment: String,
}

pub struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

struct Issuer {
    issuer: String,
    audiences: Vec<String>,
    keys: Vec<Key>,
    claims: [String; 4],
    require_exp: bool,
    skew: u64,
}

/// Every configured issuer with its keys, loaded once.
#[derive(Default)]
pub struct JwtVerifier {
    issuers: Vec<Issuer>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field(
                "issuers",
                &self.issuers.iter().map(|i| &i.issuer).collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn b64(part: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .ok()
}

fn claim_names(c: Option<&ClaimNames>) -> [String; 4] {
    let pick = |v: Option<&Option<String>>, d: &str| {
        v.and_then(|x| x.clone()).unwrap_or_else(|| d.to_string())
    };
    [
        pick(c.map(|c| &c.agent_id), "agent_id"),
        pick(c.map(|c| &c.team_id), "team_id"),
        pick(c.map(|c| &c.project_id), "project_id"),
        pick(c.map(|c| &c.environment), "environment"),
    ]
}

/// The one algorithm a JWKS key may verify, or why it is not used.
fn key_algorithm(jwk: &Jwk) -> Result<Algorithm, String> {
    use jsonwebtoken::jwk::{KeyOperations, PublicKeyUse};
    // RFC 7517 §4.2, §4.3: a key published for encryption, or for
    // operations other than verifying, never verifies a signature.
    if let Some(u) = jwk.common.public_key_use.as_ref() {
        if *u != PublicKeyUse::Signature {
            return Err(format!("its `use` is {u:?}, not `sig`"));
        }
    }
    if let Some(ops) = jwk.common.key_operations.as_ref() {
        if !ops.contains(&KeyOperations::Verify) {
            return Err("its `key_ops` do not include `verify`".into());
        }
    }
    let by_type = match &jwk.algorithm {
        AlgorithmParameters::RSA(rsa) => {
            let n = b64(&rsa.n).ok_or("RSA modulus is not base64url")?;
            let first = n.iter().position(|b| *b != 0).unwrap_or(n.len());
            let bits = (n.len() - first) * 8
                - n.get(first)
                    .map(|b| b.leading_zeros() as usize)
                    .unwrap_or(0);
            if bits < 2048 {
                return Err(format!(
                    "RSA key of {bits} bits; at least 2048 are required"
                ));
            }
            Algorithm::RS256
        }
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
            Algorithm::ES256
        }
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        AlgorithmParameters::OctetKey(_) => {
            return Err("`oct` keys in a JWKS are ignored; HS256 needs hs256_secret_file".into())
        }
        _ => return Err("key type or curve not supported (RS256, ES256, EdDSA)".into()),
    };
    let declared = jwk.common.key_algorithm.map(|a| match a {
        KeyAlgorithm::RS256 => Some(Algorithm::RS256),
        KeyAlgorithm::ES256 => Some(Algorithm::ES256),
        KeyAlgorithm::EdDSA => Some(Algorithm::EdDSA),
        _ => None,
    });
    match declared {
        None => Ok(by_type),
        Some(Some(a)) if a == by_type => Ok(a),
        Some(_) => Err(format!(
            "its `alg` does not match its key type (expected {by_type:?})"
        )),
    }
}

impl JwtVerifier {
    /// Load every issuer's keys. Errors name the issuer, the file and why.
    pub fn load(issuers: &[JwtIssuer]) -> Result<JwtVerifier, String> {
        Self::load_with(issuers, &std::collections::HashMap::new())
    }

    /// As [`load`](Self::load), with the JWKS documents fetched from
    /// `jwks_url`s (URL → text; the caller fetches, off the request path).
    /// An issuer whose URL has not been fetched yet has no URL keys: its
    /// tokens fail `token-unknown-key` until the first fetch succeeds.
    pub fn load_with(
        issuers: &[JwtIssuer],
        fetched: &std::collections::HashMap<String, String>,
    ) -> Result<JwtVerifier, String> {
        let mut out = Vec::new();
        for cfg in issuers {
            let name = &cfg.issuer;
            let mut keys = Vec::new();
            if let Some(path) = &cfg.jwks_file {
                keys.extend(load_jwks(name, path)?);
            }
            if let Some(url) = &cfg.jwks_url {
                if let Some(text) = fetched.get(url) {
                    keys.extend(parse_jwks(name, url, text)?);
                }
            }
            if let Some(path) = &cfg.hs256_secret_file {
                let secret = std::fs::read(path)
                    .map_err(|e| format!("jwt issuer {name}: {}: {e}", path.display()))?;
                let secret = secret.trim_ascii();
                if secret.len() < 32 {
                    return Err(format!(
                        "jwt issuer {name}: {}: an HS256 secret needs at least 32 bytes",
                        path.display()
                    ));
                }
                keys.push(Key {
                    kid: None,
                    alg: Algorithm::HS256,
                    key: DecodingKey::from_secret(secret),
                });
            }
            if keys.is_empty() && cfg.jwks_url.is_none() {
                return Err(format!("jwt issuer {name}: no usable key"));
            }
            out.push(Issuer {
                issuer: cfg.issuer.clone(),
                audiences: cfg.audiences.clone(),
                keys,
                claims: claim_names(cfg.claims.as_ref()),
                require_exp: cfg.require_exp,
                skew: cfg.clock_skew_s,
            });
        }
        Ok(JwtVerifier { issuers: out })
    }

    pub fn is_empty(&self) -> bool {
        self.issuers.is_empty()
    }

    /// Verify `token` at `now` (Unix seconds).
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, TokenFailure> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenFailure::TooLarge);
        }
        let parts: Vec<&str> = token.split('.').collect();
        let [h, p, sig] = parts[..] else {
            return Err(TokenFailure::Malformed);
        };
        if sig.is_empty() {
            // An unsigned token (`alg: none` style).
            return Err(TokenFailure::AlgorithmNotAllowed);
        }
        let json =
            |part: &str| -> Result<serde_json::Map<String, serde_json::Value>, TokenFailure> {
                let bytes = b64(part).ok_or(TokenFailure::Malformed)?;
                match serde_json::from_slice(&bytes) {
                    Ok(serde_json::Value::Object(m)) => Ok(m),
                    _ => Err(TokenFailure::Malformed),
                }
            };
        let header = json(h)?;
        let payload = json(p)?;
        if b64(sig).is_none() {
            return Err(TokenFailure::Malformed);
        }
        let alg = header
            .get("alg")
            .and_then(|a| a.as_str())
            .ok_or(TokenFailure::Malformed)?;
        if header.contains_key("crit") {
            // We implement no JWS extensions, so every critical one is unknown.
            return Err(TokenFailure::CriticalHeader);
        }
        match header.get("typ") {
            None => {}
            Some(serde_json::Value::String(t))
                if t.eq_ignore_ascii_case("JWT") || t.eq_ignore_ascii_case("at+jwt") => {}
            Some(_) => return Err(TokenFailure::BadType),
        }
        // Time claims of the wrong JSON type are refused, never skipped or
        // taken as absent (the CVE-2026-25537 class of bug).
        for c in ["exp", "nbf", "iat"] {
            if payload.get(c).is_some_and(|v| !v.is_number()) {
                return Err(TokenFailure::InvalidClaim);
            }
        }
        let iss = payload
            .get("iss")
            .and_then(|v| v.as_str())
            .ok_or(TokenFailure::UnknownIssuer)?;
        let issuer = self
            .issuers
            .iter()
            .find(|i| i.issuer == iss)
            .ok_or(TokenFailure::UnknownIssuer)?;
        // The algorithm comes from the configured keys: the token's `alg`
        // only selects among them and must match one exactly.
        let alg: Algorithm = alg.parse().map_err(|_| TokenFailure::AlgorithmNotAllowed)?;
        let by_alg: Vec<&Key> = issuer.keys.iter().filter(|k| k.alg == alg).collect();
        if by_alg.is_empty() {
            return Err(TokenFailure::AlgorithmNotAllowed);
        }
        let kid = header.get("kid").and_then(|k| k.as_str());
        let candidates: Vec<&Key> = by_alg
            .into_iter()
            .filter(|k| match (kid, &k.kid) {
                (Some(want), Some(have)) => want == have,
                _ => true,
            })
            .collect();
        if candidates.is_empty() {
            return Err(TokenFailure::UnknownKey);
        }
        let mut failure = TokenFailure::BadSignature;
        for key in candidates {
            let mut v = Validation::new(key.alg);
            // exp/nbf/iat are checked below against the caller's clock, with
            // their JSON types enforced; the library checks the signature,
            // issuer, audience and that `exp` is present.
            v.validate_exp = false;
            v.validate_nbf = false;
            // The library checks `aud` (and `iss`) only when the token
            // carries it: a configured audience must be required, or a
            // token without `aud` (or with one of the wrong JSON type)
            // would pass.
            v.required_spec_claims = HashSet::from(["iss".to_string()]);
            if issuer.require_exp {
                v.required_spec_claims.insert("exp".to_string());
            }
            v.set_issuer(&[&issuer.issuer]);
            if issuer.audiences.is_empty() {
                v.validate_aud = false;
            } else {
                v.set_audience(&issuer.audiences);
                v.required_spec_claims.insert("aud".to_string());
            }
            match jsonwebtoken::decode::<serde_json::Value>(token, &key.key, &v) {
                Ok(_) => return claims(issuer, &payload, now),
                Err(e) => {
                    failure = match e.kind() {
                        ErrorKind::InvalidSignature => TokenFailure::BadSignature,
                        ErrorKind::ExpiredSignature => TokenFailure::Expired,
                        ErrorKind::ImmatureSignature => TokenFailure::NotYetValid,
                        ErrorKind::InvalidAudience => TokenFailure::WrongAudience,
                        ErrorKind::InvalidIssuer => TokenFailure::UnknownIssuer,
                        // There, but not as the library reads it (an `exp`
                        // beyond u64): of the wrong type, not missing.
                        ErrorKind::MissingRequiredClaim(c)
                            if c == "exp" && payload.contains_key("exp") =>
                        {
                            TokenFailure::InvalidClaim
                        }
                        ErrorKind::MissingRequiredClaim(c) if c == "exp" => {
                            TokenFailure::MissingExp
                        }
                        ErrorKind::MissingRequiredClaim(c) if c == "aud" => {
                            TokenFailure::WrongAudience
                        }
                        ErrorKind::MissingRequiredClaim(c) if c == "iss" => {
                            TokenFailure::UnknownIssuer
                        }
                        ErrorKind::InvalidAlgorithm => TokenFailure::AlgorithmNotAllowed,
                        ErrorKind::InvalidClaimFormat(c) if c == "aud" => {
                            TokenFailure::WrongAudience
                        }
                        ErrorKind::InvalidClaimFormat(c) if c == "iss" => {
                            TokenFailure::UnknownIssuer
                        }
                        ErrorKind::InvalidClaimFormat(_) => TokenFailure::InvalidClaim,
                        ErrorKind::InvalidToken
                        | ErrorKind::Base64(_)
                        | ErrorKind::Json(_)
                        | ErrorKind::Utf8(_) => TokenFailure::Malformed,
                        _ => TokenFailure::BadSignature,
                    };
                    // Only a signature mismatch is worth trying the next key
                    // for; any other failure is the token's, whichever key.
                    if failure != TokenFailure::BadSignature {
                        return Err(failure);
                    }
                }
            }
        }
        Err(failure)
    }
}

fn claims(
    issuer: &Issuer,
    payload: &serde_json::Map<String, serde_json::Value>,
    now: u64,
) -> Result<Claims, TokenFailure> {
    // A time claim of the wrong JSON type is malformed, never skipped
    // (the CVE-2026-25537 class of bug).
    let time = |name: &str| -> Result<Option<f64>, TokenFailure> {
        match payload.get(name) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or(TokenFailure::InvalidClaim),
        }
    };
    let (now, skew) = (now as f64, issuer.skew as f64);
    match time("exp")? {
        Some(exp) if exp + skew < now => return Err(TokenFailure::Expired),
        None if issuer.require_exp => return Err(TokenFailure::MissingExp),
        _ => {}
    }
    if time("nbf")?.is_some_and(|nbf| nbf > now + skew) {
        return Err(TokenFailure::NotYetValid);
    }
    if time("iat")?.is_some_and(|iat| iat > now + skew) {
        return Err(TokenFailure::IssuedInFuture);
    }
    let get = |name: &str| {
        payload
            .get(name)
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string()
    };
    let agent_id = get(&issuer.claims[0]);
    // The agent id travels in metadata, logs and headers: same rules as in
    // the config.
    if Name::try_from(agent_id.clone()).is_err() || agent_id.contains(':') {
        return Err(TokenFailure::MissingAgentClaim);
    }
    Ok(Claims {
        agent_id,
        team_id: get(&issuer.claims[1]),
        project_id: get(&issuer.claims[2]),
        environment: get(&issuer.claims[3]),
    })
}

fn load_jwks(issuer: &str, path: &Path) -> Result<Vec<Key>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("jwt issuer {issuer}: {}: {e}", path.display()))?;
    parse_jwks(issuer, &path.display().to_string(), &text)
}

/// The usable keys of a JWKS document (`source` names where it came from in
/// errors). Keys of other types, `oct` keys and keys whose `alg` does not
/// fit their type are skipped with a warning; an RSA key under 2048 bits is
/// an error.
pub fn parse_jwks(issuer: &str, source: &str, text: &str) -> Result<Vec<Key>, String> {
    let raw: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| format!("jwt issuer {issuer}: {source}: not JSON: {e}"))?;
    let entries = raw
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or_else(|| format!("jwt issuer {issuer}: {source}: no \"keys\" array"))?;
    let mut keys = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let where_ = format!("jwt issuer {issuer}: {source} keys[{i}]");
        let jwk: Jwk = match serde_json::from_value(entry.clone()) {
            Ok(j) => j,
            Err(e) => {
                tracing::warn!("{where_}: skipped: {e}");
                continue;
            }
        };
        let alg = match key_algorithm(&jwk) {
            Ok(a) => a,
            Err(e) if e.starts_with("RSA key of") => return Err(format!("{where_}: {e}")),
            Err(e) => {
                tracing::warn!("{where_}: skipped: {e}");
                continue;
            }
        };
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("{where_}: {e}"))?;
        keys.push(Key {
            kid: jwk.common.key_id.clone(),
            alg,
            key,
        });
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const ISS: &str = "https://idp.test";
    const NOW: u64 = 1_800_000_000;
    const HS_SECRET: &str = "0123456789abcdef0123456789abcdef-test";

    fn fixture(name: &str) -> Vec<u8> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        std::fs::read(p).expect("fixture")
    }

    fn rsa() -> EncodingKey {
        EncodingKey::from_rsa_pem(&fixture("rsa2048.pem")).expect("rsa")
    }
    fn ec() -> EncodingKey {
        EncodingKey::from_ec_pem(&fixture("ec256.pem")).expect("ec")
    }
    fn ed() -> EncodingKey {
        EncodingKey::from_ed_pem(&fixture("ed25519.pem")).expect("ed")
    }

    fn public(key: &EncodingKey, alg: Algorithm, kid: &str) -> serde_json::Value {
        let mut jwk = Jwk::from_encoding_key(key, alg).expect("jwk");
        jwk.common.key_id = Some(kid.into());
        serde_json::to_value(jwk).expect("json")
    }

    /// An issuer with RS256, ES256 and EdDSA keys in its JWKS (plus an `oct`
    /// key that must be ignored) and an HS256 secret file.
    fn verifier(extra: serde_json::Value) -> (JwtVerifier, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let jwks = json!({"keys": [
            public(&rsa(), Algorithm::RS256, "rsa"),
            public(&ec(), Algorithm::ES256, "ec"),
            public(&ed(), Algorithm::EdDSA, "ed"),
            {"kty": "oct", "k": "c2VjcmV0", "kid": "oct", "alg": "HS256"},
            extra,
        ]});
        std::fs::write(dir.path().join("jwks.json"), jwks.to_string()).expect("write");
        std::fs::write(dir.path().join("hs"), HS_SECRET).expect("write");
        let cfg: JwtIssuer = serde_yaml_ng_free(&format!(
            r#"{{"issuer": "{ISS}", "audiences": ["clawgress"], "jwks_file": "{}", "hs256_secret_file": "{}"}}"#,
            dir.path().join("jwks.json").display(),
            dir.path().join("hs").display()
        ));
        (JwtVerifier::load(&[cfg]).expect("load"), dir)
    }

    fn serde_yaml_ng_free(json: &str) -> JwtIssuer {
        serde_json::from_str(json).expect("issuer")
    }

    fn claims() -> serde_json::Value {
        json!({"iss": ISS, "aud": "clawgress", "exp": NOW + 300, "iat": NOW - 10,
               "agent_id": "bot-7", "team_id": "infra", "environment": "prod"})
    }

    fn token(
        alg: Algorithm,
        kid: Option<&str>,
        key: &EncodingKey,
        body: &serde_json::Value,
    ) -> String {
        let mut h = Header::new(alg);
        h.kid = kid.map(str::to_string);
        encode(&h, body, key).expect("encode")
    }

    fn b64u(v: &serde_json::Value) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    }

    #[test]
    fn keys_not_for_verifying_are_not_used() {
        let mut enc = public(&ec(), Algorithm::ES256, "enc");
        enc["use"] = json!("enc");
        let mut wrap = public(&ed(), Algorithm::EdDSA, "wrap");
        wrap["key_ops"] = json!(["wrapKey"]);
        for (extra, alg, kid, key) in [
            (enc, Algorithm::ES256, "enc", ec()),
            (wrap, Algorithm::EdDSA, "wrap", ed()),
        ] {
            let (v, _d) = verifier(extra);
            let t = token(alg, Some(kid), &key, &claims());
            assert_eq!(v.verify(&t, NOW), Err(TokenFailure::UnknownKey), "{kid}");
        }
        let mut sig = public(&ec(), Algorithm::ES256, "sig");
        sig["use"] = json!("sig");
        sig["key_ops"] = json!(["verify"]);
        let (v, _d) = verifier(sig);
        let t = token(Algorithm::ES256, Some("sig"), &ec(), &claims());
        assert!(v.verify(&t, NOW).is_ok());
    }

    #[test]
    fn every_configured_algorithm_verifies() {
        let (v, _d) = verifier(json!({}));
        for (alg, kid, key) in [
            (Algorithm::RS256, Some("rsa"), rsa()),
            (Algorithm::ES256, Some("ec"), ec()),
            (Algorithm::EdDSA, Some("ed"), ed()),
            (Algorithm::EdDSA, None, ed()),
            (
                Algorithm::HS256,
                None,
                EncodingKey::from_secret(HS_SECRET.as_bytes()),
            ),
        ] {
            let c = v
                .verify(&token(alg, kid, &key, &claims()), NOW)
                .expect("valid");
            assert_eq!(
                (c.agent_id.as_str(), c.team_id.as_str()),
                ("bot-7", "infra"),
                "{alg:?}"
            );
        }
    }

    #[test]
    fn forged_and_malformed_tokens_name_the_failed_check() {
        let (v, _d) = verifier(json!({}));
        let good = token(Algorithm::RS256, Some("rsa"), &rsa(), &claims());
        let with = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut c = claims();
            f(&mut c);
            token(Algorithm::RS256, Some("rsa"), &rsa(), &c)
        };
        let parts: Vec<&str> = good.split('.').collect();
        let unsigned = format!(
            "{}.{}.",
            b64u(&json!({"alg": "none", "typ": "JWT"})),
            parts[1]
        );
        let none_sig = format!(
            "{}.{}.{}",
            b64u(&json!({"alg": "none"})),
            parts[1],
            parts[2]
        );
        let tampered = {
            let mut c = claims();
            c["agent_id"] = json!("admin");
            format!("{}.{}.{}", parts[0], b64u(&c), parts[2])
        };
        // RS/HS confusion: HS256 keyed with the RSA public key's text.
        let confused = token(
            Algorithm::HS256,
            Some("rsa"),
            &EncodingKey::from_secret(&fixture("rsa2048.pem")),
            &claims(),
        );
        let es_zero = {
            let t = token(Algorithm::ES256, Some("ec"), &ec(), &claims());
            let p: Vec<&str> = t.split('.').collect();
            format!(
                "{}.{}.{}",
                p[0],
                p[1],
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([0u8; 64])
            )
        };
        let header_with = |extra: serde_json::Value| {
            let mut h = json!({"alg": "RS256", "kid": "rsa"});
            for (k, val) in extra.as_object().expect("object") {
                h[k] = val.clone();
            }
            format!("{}.{}.{}", b64u(&h), parts[1], parts[2])
        };
        let cases: Vec<(String, TokenFailure)> = vec![
            (unsigned, TokenFailure::AlgorithmNotAllowed),
            (none_sig, TokenFailure::AlgorithmNotAllowed),
            (tampered, TokenFailure::BadSignature),
            (es_zero, TokenFailure::BadSignature),
            (confused, TokenFailure::BadSignature),
            (
                token(Algorithm::RS256, Some("nope"), &rsa(), &claims()),
                TokenFailure::UnknownKey,
            ),
            (
                token(
                    Algorithm::HS384,
                    None,
                    &EncodingKey::from_secret(HS_SECRET.as_bytes()),
                    &claims(),
                ),
                TokenFailure::AlgorithmNotAllowed,
            ),
            (
                with(&|c| c["iss"] = json!("https://evil.test")),
                TokenFailure::UnknownIssuer,
            ),
            (
                with(&|c| c["aud"] = json!("someone-else")),
                TokenFailure::WrongAudience,
            ),
            // A configured audience is required: absent, of the wrong JSON
            // type or empty, `aud` does not name us.
            (
                with(&|c| {
                    c.as_object_mut().map(|o| o.remove("aud"));
                }),
                TokenFailure::WrongAudience,
            ),
            (with(&|c| c["aud"] = json!(7)), TokenFailure::WrongAudience),
            (with(&|c| c["aud"] = json!([])), TokenFailure::WrongAudience),
            (
                with(&|c| c["aud"] = json!(["someone-else", "other"])),
                TokenFailure::WrongAudience,
            ),
            (with(&|c| c["iss"] = json!(7)), TokenFailure::UnknownIssuer),
            (with(&|c| c["exp"] = json!(NOW - 61)), TokenFailure::Expired),
            (
                with(&|c| c["exp"] = json!((NOW + 300).to_string())),
                TokenFailure::InvalidClaim,
            ),
            (
                with(&|c| c["nbf"] = json!(null)),
                TokenFailure::InvalidClaim,
            ),
            (
                with(&|c| c["iat"] = json!(true)),
                TokenFailure::InvalidClaim,
            ),
            (
                with(&|c| c["exp"] = json!(u64::MAX as f64 * 4.0)),
                TokenFailure::InvalidClaim,
            ),
            (
                with(&|c| {
                    c.as_object_mut().map(|o| o.remove("exp"));
                }),
                TokenFailure::MissingExp,
            ),
            (
                with(&|c| c["nbf"] = json!(NOW + 120)),
                TokenFailure::NotYetValid,
            ),
            (
                with(&|c| c["iat"] = json!(NOW + 120)),
                TokenFailure::IssuedInFuture,
            ),
            (
                with(&|c| {
                    c.as_object_mut().map(|o| o.remove("agent_id"));
                }),
                TokenFailure::MissingAgentClaim,
            ),
            (
                with(&|c| c["agent_id"] = json!("a:b")),
                TokenFailure::MissingAgentClaim,
            ),
            (
                header_with(json!({"crit": ["exp"]})),
                TokenFailure::CriticalHeader,
            ),
            (
                header_with(json!({"typ": "JOSE+JSON"})),
                TokenFailure::BadType,
            ),
            ("not-a-jwt".into(), TokenFailure::Malformed),
            ("a.b.c".into(), TokenFailure::Malformed),
            (
                format!("{}.{}!.{}", parts[0], parts[1], parts[2]),
                TokenFailure::Malformed,
            ),
            (
                format!("{good}{}", "A".repeat(MAX_TOKEN_BYTES)),
                TokenFailure::TooLarge,
            ),
        ];
        for (i, (tok, want)) in cases.iter().enumerate() {
            assert_eq!(v.verify(tok, NOW), Err(*want), "case {i}");
        }
        // A token's own key hints are never fetched or trusted: a token
        // signed by a foreign key that names it in jku/jwk is just unsigned
        // by anything configured.
        let foreign = EncodingKey::from_secret(b"attacker-chosen-secret-attacker-chosen");
        let mut h = Header::new(Algorithm::HS256);
        h.jku = Some("http://127.0.0.1:1/jwks.json".into());
        let t = encode(&h, &claims(), &foreign).expect("encode");
        assert_eq!(v.verify(&t, NOW), Err(TokenFailure::BadSignature));
        // Nor an embedded `jwk` or an `x5u`: an RS256 token signed by the
        // attacker's own RSA key, which it carries and points at.
        let attacker = EncodingKey::from_rsa_pem(&fixture("rsa2048-b.pem")).expect("rsa b");
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some("rsa".into());
        h.jwk = serde_json::from_value(public(&attacker, Algorithm::RS256, "rsa")).ok();
        h.x5u = Some("http://127.0.0.1:1/cert.pem".into());
        assert!(h.jwk.is_some(), "the embedded jwk is set");
        let t = encode(&h, &claims(), &attacker).expect("encode");
        assert_eq!(v.verify(&t, NOW), Err(TokenFailure::BadSignature));
        // An issuer with RSA keys only: an HS256 token keyed with the
        // public key's text is refused by algorithm, never verified as HMAC.
        let dir = tempfile::tempdir().expect("tempdir");
        let jwks = json!({"keys": [public(&rsa(), Algorithm::RS256, "rsa")]});
        std::fs::write(dir.path().join("j.json"), jwks.to_string()).expect("write");
        let rsa_only = JwtVerifier::load(&[serde_json::from_value(
            json!({"issuer": ISS, "audiences": ["clawgress"], "jwks_file": dir.path().join("j.json")}),
        )
        .expect("cfg")])
        .expect("load");
        assert!(rsa_only.verify(&good, NOW).is_ok());
        for pem in ["rsa2048.pem", "rsa2048.pub.pem"] {
            let t = token(
                Algorithm::HS256,
                Some("rsa"),
                &EncodingKey::from_secret(&fixture(pem)),
                &claims(),
            );
            assert_eq!(
                rsa_only.verify(&t, NOW),
                Err(TokenFailure::AlgorithmNotAllowed),
                "{pem}"
            );
        }
        // typ is optional and case-insensitive; skew tolerates 60 s.
        assert!(v
            .verify(&header_with(json!({"typ": "at+jwt"})), NOW)
            .is_err_and(|e| e == TokenFailure::BadSignature));
        assert!(v
            .verify(&with(&|c| c["exp"] = json!(NOW - 30)), NOW)
            .is_ok());
    }

    #[test]
    fn weak_or_unusable_keys_are_refused_at_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let small = EncodingKey::from_rsa_pem(&fixture("rsa1024.pem")).expect("rsa1024");
        let jwks = json!({"keys": [public(&small, Algorithm::RS256, "small")]});
        std::fs::write(dir.path().join("j.json"), jwks.to_string()).expect("write");
        let cfg: JwtIssuer =
            serde_json::from_value(json!({"issuer": ISS, "jwks_file": dir.path().join("j.json")}))
                .expect("cfg");
        let err = JwtVerifier::load(&[cfg]).expect_err("1024-bit RSA");
        assert!(err.contains("at least 2048"), "{err}");

        let only_oct = json!({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]});
        std::fs::write(dir.path().join("o.json"), only_oct.to_string()).expect("write");
        let cfg: JwtIssuer =
            serde_json::from_value(json!({"issuer": ISS, "jwks_file": dir.path().join("o.json")}))
                .expect("cfg");
        let err = JwtVerifier::load(&[cfg]).expect_err("oct only");
        assert!(err.contains("no usable key"), "{err}");

        std::fs::write(dir.path().join("short"), "short").expect("write");
        let cfg: JwtIssuer = serde_json::from_value(
            json!({"issuer": ISS, "hs256_secret_file": dir.path().join("short")}),
        )
        .expect("cfg");
        assert!(JwtVerifier::load(&[cfg])
            .expect_err("short")
            .contains("32 bytes"));

        let cfg: JwtIssuer = serde_json::from_value(
            json!({"issuer": ISS, "jwks_file": dir.path().join("missing.json")}),
        )
        .expect("cfg");
        assert!(JwtVerifier::load(&[cfg])
            .expect_err("missing")
            .contains("missing.json"));
    }

    #[test]
    fn exp_may_be_optional_per_issuer_and_claim_names_are_configurable() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("hs"), HS_SECRET).expect("write");
        let cfg: JwtIssuer = serde_json::from_value(json!({
            "issuer": ISS, "hs256_secret_file": dir.path().join("hs"), "require_exp": false,
            "claims": {"agent_id": "sub", "team_id": "grp"}
        }))
        .expect("cfg");
        let v = JwtVerifier::load(&[cfg]).expect("load");
        let t = token(
            Algorithm::HS256,
            None,
            &EncodingKey::from_secret(HS_SECRET.as_bytes()),
            &json!({"iss": ISS, "sub": "svc-1", "grp": "ml"}),
        );
        let c = v.verify(&t, NOW).expect("valid without exp");
        assert_eq!((c.agent_id.as_str(), c.team_id.as_str()), ("svc-1", "ml"));
    }
}
