//! The `Proxy-Authorization` parser against a directory with API-key,
//! disabled and JWT-listed agents: never a panic, never an identity for a
//! header that does not carry the one key.
#![no_main]

use std::sync::LazyLock;

use clawgress_policy::{AgentDirectory, Document};
use libfuzzer_sys::fuzz_target;

/// SHA-256 of "k3y-for-fuzzing-0123456789abcdef".
const DOC: &str = r#"
agents:
  - {agent_id: bot, auth_type: api_key, api_key_sha256: "5b6d6e6a3e0f1e84e1c43bc0a4b7c3e6d3b7fcf0ab9a3b2c0ed1b1a2e7f8d9c0"}
  - {agent_id: off, auth_type: api_key, status: disabled, api_key_sha256: "5b6d6e6a3e0f1e84e1c43bc0a4b7c3e6d3b7fcf0ab9a3b2c0ed1b1a2e7f8d9c0"}
  - {agent_id: jwt-agent, auth_type: jwt}
"#;

static DIR: LazyLock<AgentDirectory> = LazyLock::new(|| {
    let doc = Document::from_yaml(DOC).expect("fuzz directory config");
    AgentDirectory::new(&doc.policy())
});

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = DIR.authenticate(Some(s)) {
        // No key hashes to the placeholder above, so nothing authenticates.
        panic!("{s:?} authenticated as {id:?}");
    }
});
