//! Request paths as the origin server will read them, so a `path_prefix`
//! rule cannot be dodged by `/x/../admin`, `//admin` or `/%61dmin`.
//!
//! Normalisation: the query and fragment are dropped, percent-escapes of
//! unreserved characters decoded (RFC 3986 §2.3), runs of `/` merged, and
//! dot segments removed (§5.2.4). Forms that servers disagree on are
//! refused rather than guessed: encoded `/` or `\`, a raw `\`, NUL and other
//! control characters, and malformed escapes.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path is not in origin form (must start with '/')")]
    NotOrigin,
    #[error("path holds an encoded or raw slash/backslash, NUL or control character")]
    Ambiguous,
    #[error("path holds a malformed percent-escape")]
    BadEscape,
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Normalise a request target's path (the query and fragment are ignored).
pub fn normalise_path(raw: &str) -> Result<String, PathError> {
    let path = raw.split(['?', '#']).next().unwrap_or("");
    if path.is_empty() {
        return Ok("/".into());
    }
    if !path.starts_with('/') {
        return Err(PathError::NotOrigin);
    }
    // Decode unreserved escapes; keep (upper-cased) the rest.
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(PathError::BadEscape);
            };
            let v = h * 16 + l;
            if matches!(v, b'/' | b'\\') || v < 0x20 || v == 0x7f {
                return Err(PathError::Ambiguous);
            }
            if unreserved(v) {
                out.push(v as char);
            } else {
                out.push('%');
                out.push(char::from(b"0123456789ABCDEF"[usize::from(h)]));
                out.push(char::from(b"0123456789ABCDEF"[usize::from(l)]));
            }
            i += 3;
            continue;
        }
        if b == b'\\' || b < 0x20 || b == 0x7f {
            return Err(PathError::Ambiguous);
        }
        // Multi-byte UTF-8 is copied whole.
        let ch_len = path[i..].chars().next().map(char::len_utf8).unwrap_or(1);
        out.push_str(&path[i..i + ch_len]);
        i += ch_len;
    }
    // Merge slashes and remove dot segments.
    let mut segs: Vec<&str> = Vec::new();
    let trailing = out.ends_with('/') || out.ends_with("/.") || out.ends_with("/..");
    for seg in out.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segs.pop();
            }
            s => segs.push(s),
        }
    }
    let mut norm = String::with_capacity(out.len());
    for s in &segs {
        norm.push('/');
        norm.push_str(s);
    }
    if norm.is_empty() || (trailing && !norm.ends_with('/')) {
        norm.push('/');
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dodges_are_normalised_away() {
        for (raw, want) in [
            ("/admin", "/admin"),
            ("/x/../admin", "/admin"),
            ("//admin", "/admin"),
            ("/./admin", "/admin"),
            ("/%61dmin", "/admin"),
            ("/%2e/admin", "/admin"),
            ("/%2E%2E/admin", "/admin"),
            ("/public/../secret", "/secret"),
            ("/public/%2e%2e/secret", "/secret"),
            ("/a/b/../../../../c", "/c"),
            ("/simple/x/?q=/../admin", "/simple/x/"),
            ("/a/b/..", "/a/"),
            ("", "/"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            ("/café", "/café"),
        ] {
            assert_eq!(normalise_path(raw).as_deref(), Ok(want), "{raw}");
        }
    }

    #[test]
    fn ambiguous_forms_are_refused() {
        for raw in [
            "/x/..%2fadmin",
            "/%2fadmin",
            "/%5cadmin",
            "/\\admin",
            "/a%00b",
            "/a\tb",
            "/%zz",
            "/%4",
            "*",
            "admin",
        ] {
            assert!(normalise_path(raw).is_err(), "{raw}");
        }
    }
}
