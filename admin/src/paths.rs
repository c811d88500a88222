//! Paths into the config document (§7): `agents.build-bot.team_id`,
//! `policies.allow-pypi.match.destination.hosts`, `quotas.build-bot.rps_limit`.
//! List entries are addressed by their id (`agent_id`, `policy_id`, the
//! quota's `agent_id`/`team_id`/`project_id`, an issuer's `issuer`); a
//! segment with dots in it is quoted: `jwt.issuers."https://idp.example".audiences`.
//! Also a diff of two documents in the same terms.

use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct PathError {
    pub path: String,
    pub reason: String,
}

fn err(path: &str, reason: impl Into<String>) -> PathError {
    PathError {
        path: path.to_string(),
        reason: reason.into(),
    }
}

/// The keyed lists of the document and the fields that name an entry.
fn id_fields(list: &str) -> Option<&'static [&'static str]> {
    match list {
        "agents" => Some(&["agent_id"]),
        "policies" => Some(&["policy_id"]),
        "quotas" => Some(&["agent_id", "team_id", "project_id"]),
        "issuers" => Some(&["issuer"]),
        _ => None,
    }
}

/// Split a path into segments; `"…"` quotes a segment holding dots.
pub fn parse(path: &str) -> Result<Vec<String>, PathError> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = path.chars().peekable();
    let mut quoted_segment = false;
    while let Some(c) = chars.next() {
        match c {
            '"' if cur.is_empty() && !quoted_segment => {
                quoted_segment = true;
                let mut closed = false;
                for q in chars.by_ref() {
                    if q == '"' {
                        closed = true;
                        break;
                    }
                    cur.push(q);
                }
                if !closed {
                    return Err(err(path, "unterminated quote"));
                }
                if !matches!(chars.peek(), None | Some('.')) {
                    return Err(err(path, "a quoted segment must be followed by '.'"));
                }
            }
            '.' => {
                if cur.is_empty() && !quoted_segment {
                    return Err(err(path, "empty segment"));
                }
                out.push(std::mem::take(&mut cur));
                quoted_segment = false;
            }
            c => cur.push(c),
        }
    }
    if cur.is_empty() && !quoted_segment {
        return Err(err(path, "empty segment"));
    }
    out.push(cur);
    Ok(out)
}

/// A value as typed on the command line: JSON if it parses as JSON,
/// else the plain string (`set agents.a.team_id infra`).
pub fn value_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

/// Find (or, with `create`, make) the entry of keyed list `items` named `id`.
fn entry<'a>(
    items: &'a mut Vec<Value>,
    list: &str,
    id: &str,
    create: bool,
    path: &str,
) -> Result<Option<&'a mut Value>, PathError> {
    let fields = id_fields(list).ok_or_else(|| err(path, format!("{list} is not a keyed list")))?;
    let pos = items.iter().position(|v| {
        fields
            .iter()
            .any(|f| v.get(f).and_then(Value::as_str) == Some(id))
    });
    match pos {
        Some(i) => Ok(items.get_mut(i)),
        None if create => {
            let mut m = Map::new();
            m.insert(fields[0].to_string(), Value::String(id.to_string()));
            items.push(Value::Object(m));
            Ok(items.last_mut())
        }
        None => Ok(None),
    }
}

/// Set `path` to `value` in `doc`, creating maps and list entries on the way.
pub fn set(doc: &mut Value, path: &str, value: Value) -> Result<(), PathError> {
    let segs = parse(path)?;
    let mut node = doc;
    let mut i = 0;
    while i < segs.len() {
        let seg = &segs[i];
        let last = i + 1 == segs.len();
        if !node.is_object() {
            return Err(err(path, format!("{} is not a map", segs[..i].join("."))));
        }
        let obj = node.as_object_mut().ok_or_else(|| err(path, "not a map"))?;
        if id_fields(seg).is_some() && !last {
            // `agents.<id>…`: a keyed list.
            let list = obj
                .entry(seg.clone())
                .or_insert_with(|| Value::Array(Vec::new()));
            let items = list
                .as_array_mut()
                .ok_or_else(|| err(path, format!("{seg} is not a list")))?;
            let id = &segs[i + 1];
            let e = entry(items, seg, id, true, path)?
                .ok_or_else(|| err(path, "cannot create the entry"))?;
            if i + 2 == segs.len() {
                // The whole entry: keep its id.
                let mut v = value;
                if let (Some(m), Some(f)) = (v.as_object_mut(), id_fields(seg)) {
                    if !f.iter().any(|f| m.contains_key(*f)) {
                        m.insert(f[0].to_string(), Value::String(id.clone()));
                    }
                }
                *e = v;
                return Ok(());
            }
            node = e;
            i += 2;
            continue;
        }
        if last {
            obj.insert(seg.clone(), value);
            return Ok(());
        }
        node = obj
            .entry(seg.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        i += 1;
    }
    Ok(())
}

/// Delete `path` from `doc`; an error if nothing is there.
pub fn delete(doc: &mut Value, path: &str) -> Result<(), PathError> {
    let segs = parse(path)?;
    let mut node = doc;
    let mut i = 0;
    while i < segs.len() {
        let seg = &segs[i];
        let obj = node
            .as_object_mut()
            .ok_or_else(|| err(path, format!("{} is not a map", segs[..i].join("."))))?;
        if id_fields(seg).is_some() && i + 1 < segs.len() {
            let items = obj
                .get_mut(seg)
                .and_then(Value::as_array_mut)
                .ok_or_else(|| err(path, "nothing there"))?;
            let id = &segs[i + 1];
            if i + 2 == segs.len() {
                let fields = id_fields(seg).unwrap_or(&[]);
                let before = items.len();
                items.retain(|v| {
                    !fields
                        .iter()
                        .any(|f| v.get(f).and_then(Value::as_str) == Some(id.as_str()))
                });
                return if items.len() < before {
                    Ok(())
                } else {
                    Err(err(path, "nothing there"))
                };
            }
            node = entry(items, seg, id, false, path)?.ok_or_else(|| err(path, "nothing there"))?;
            i += 2;
            continue;
        }
        if i + 1 == segs.len() {
            return obj
                .remove(seg)
                .map(|_| ())
                .ok_or_else(|| err(path, "nothing there"));
        }
        node = obj.get_mut(seg).ok_or_else(|| err(path, "nothing there"))?;
        i += 1;
    }
    Ok(())
}

/// The value at `path`, if any.
pub fn get(doc: &Value, path: &str) -> Result<Option<Value>, PathError> {
    let mut d = doc.clone();
    let segs = parse(path)?;
    let mut node = &mut d;
    let mut i = 0;
    while i < segs.len() {
        let seg = &segs[i];
        let Some(obj) = node.as_object_mut() else {
            return Ok(None);
        };
        if id_fields(seg).is_some() && i + 1 < segs.len() {
            let Some(items) = obj.get_mut(seg).and_then(Value::as_array_mut) else {
                return Ok(None);
            };
            match entry(items, seg, &segs[i + 1], false, path)? {
                Some(e) => node = e,
                None => return Ok(None),
            }
            i += 2;
            continue;
        }
        match obj.get_mut(seg) {
            Some(v) => node = v,
            None => return Ok(None),
        }
        i += 1;
    }
    Ok(Some(node.clone()))
}

/// Keyed lists become maps by id, so a diff names entries, not positions.
fn keyed(v: &Value, key: Option<&str>) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), keyed(v, Some(k))))
                .collect(),
        ),
        Value::Array(items) => match key.and_then(id_fields) {
            Some(fields) => Value::Object(
                items
                    .iter()
                    .map(|e| {
                        let id = fields
                            .iter()
                            .find_map(|f| e.get(f).and_then(Value::as_str))
                            .unwrap_or("?")
                            .to_string();
                        (id, keyed(e, None))
                    })
                    .collect(),
            ),
            None => v.clone(),
        },
        _ => v.clone(),
    }
}

fn quote(seg: &str) -> String {
    if seg.contains('.') {
        format!("\"{seg}\"")
    } else {
        seg.to_string()
    }
}

/// The changes from `old` to `new`, one line each, addressed by path:
/// `+ path: value`, `- path`, `~ path: old -> new`.
pub fn diff(old: &Value, new: &Value) -> Vec<String> {
    changes(old, new)
        .into_iter()
        .map(|c| match (c.old, c.new) {
            (None, Some(n)) => format!("+ {}: {n}", c.path),
            (Some(_), None) => format!("- {}", c.path),
            (Some(o), Some(n)) => format!("~ {}: {o} -> {n}", c.path),
            (None, None) => format!("? {}", c.path),
        })
        .collect()
}

/// One changed path: its value before (`None`: added) and after (`None`:
/// removed), for side-by-side views.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Change {
    pub path: String,
    pub old: Option<Value>,
    pub new: Option<Value>,
}

/// Every changed path between two documents, agents and policies keyed by
/// id, in document order.
pub fn changes(old: &Value, new: &Value) -> Vec<Change> {
    let mut out = Vec::new();
    walk(&keyed(old, None), &keyed(new, None), "", &mut out);
    out
}

fn walk(old: &Value, new: &Value, path: &str, out: &mut Vec<Change>) {
    let join = |k: &str| {
        if path.is_empty() {
            quote(k)
        } else {
            format!("{path}.{}", quote(k))
        }
    };
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, va) in a {
                match b.get(k) {
                    Some(vb) => walk(va, vb, &join(k), out),
                    None => out.push(Change {
                        path: join(k),
                        old: Some(va.clone()),
                        new: None,
                    }),
                }
            }
            for (k, vb) in b {
                if !a.contains_key(k) {
                    out.push(Change {
                        path: join(k),
                        old: None,
                        new: Some(vb.clone()),
                    });
                }
            }
        }
        (a, b) if a != b => out.push(Change {
            path: path.to_string(),
            old: Some(a.clone()),
            new: Some(b.clone()),
        }),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths_split_on_dots_and_quotes_hold_dots() {
        assert_eq!(
            parse("agents.build-bot.team_id").expect("ok"),
            ["agents", "build-bot", "team_id"]
        );
        assert_eq!(
            parse("jwt.issuers.\"https://idp.example\".audiences").expect("ok"),
            ["jwt", "issuers", "https://idp.example", "audiences"]
        );
        for bad in ["", ".", "a..b", "a.", "\"open", "\"a\"b"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn set_creates_entries_by_id_and_edits_them_in_place() {
        let mut d = json!({"agents": [{"agent_id": "a", "team_id": "x"}]});
        set(&mut d, "agents.a.team_id", value_of("infra")).expect("set");
        set(&mut d, "agents.b.status", value_of("disabled")).expect("set");
        set(
            &mut d,
            "policies.allow-pypi.match.destination.hosts",
            value_of(r#"["pypi.org"]"#),
        )
        .expect("set");
        set(&mut d, "quotas.a.rps_limit", value_of("10")).expect("set");
        assert_eq!(
            d,
            json!({
                "agents": [{"agent_id": "a", "team_id": "infra"}, {"agent_id": "b", "status": "disabled"}],
                "policies": [{"policy_id": "allow-pypi", "match": {"destination": {"hosts": ["pypi.org"]}}}],
                "quotas": [{"agent_id": "a", "rps_limit": 10}],
            })
        );
        assert_eq!(
            get(&d, "agents.a.team_id").expect("ok"),
            Some(json!("infra"))
        );
        assert_eq!(get(&d, "agents.zzz").expect("ok"), None);
    }

    #[test]
    fn delete_removes_fields_and_entries_and_says_when_nothing_is_there() {
        let mut d = json!({"agents": [{"agent_id": "a", "team_id": "x"}, {"agent_id": "b"}]});
        delete(&mut d, "agents.a.team_id").expect("delete");
        delete(&mut d, "agents.b").expect("delete");
        assert_eq!(d, json!({"agents": [{"agent_id": "a"}]}));
        assert!(delete(&mut d, "agents.b").is_err());
        assert!(delete(&mut d, "policies.x").is_err());
        assert!(delete(&mut d, "agents.a.nope").is_err());
    }

    #[test]
    fn set_through_a_scalar_is_an_error_not_a_panic() {
        let mut d = json!({"agents": [{"agent_id": "a", "team_id": "x"}]});
        assert!(set(&mut d, "agents.a.team_id.deeper", json!(1)).is_err());
        let mut d = json!({"agents": "oops"});
        assert!(set(&mut d, "agents.a.team_id", json!(1)).is_err());
    }

    #[test]
    fn diff_names_entries_by_id() {
        let a = json!({"agents": [{"agent_id": "a", "team_id": "x"}, {"agent_id": "b"}]});
        let b = json!({"agents": [{"agent_id": "b"}, {"agent_id": "a", "team_id": "y"}, {"agent_id": "c"}]});
        assert_eq!(
            diff(&a, &b),
            [
                "~ agents.a.team_id: \"x\" -> \"y\"",
                "+ agents.c: {\"agent_id\":\"c\"}"
            ]
        );
        assert!(diff(&a, &a).is_empty());
    }
}
