//! Hosts that must never be allowed by a policy that allows everything
//! (`*`, `0.0.0.0/0`, `::/0`): loopback, metadata, private and other
//! special-purpose addresses in every encoding an HTTP client accepts, the
//! guarded names, and malformed hosts. Each with the reason expected.

use clawgress_policy::config::{AuthType, Document};
use clawgress_policy::{Destination, Identity, PolicySet, RequestFacts};

const P: &str = "private-destination";
const M: &str = "malformed-destination";

const CORPUS: &[(&str, &str)] = &[
    // Loopback, every way a client writes it.
    ("127.0.0.1", P),
    ("127.1", P),
    ("127.0.1", P),
    ("2130706433", P),
    ("0x7f000001", P),
    ("0x7f.0.0.1", P),
    ("0x7f.1", P),
    ("0X7F.0X0.0X0.0X1", P),
    ("127.255.255.254", P),
    ("127.0.0.1.", P),
    ("017700000001", M),
    ("0177.0.0.1", M),
    ("127.000.000.001", M),
    ("0127.0.0.1", M),
    ("[::1]", P),
    ("[0:0:0:0:0:0:0:1]", P),
    ("[::ffff:127.0.0.1]", P),
    ("[::ffff:7f00:1]", P),
    ("[0:0:0:0:0:ffff:127.0.0.1]", P),
    ("[::127.0.0.1]", P),
    ("[64:ff9b::127.0.0.1]", P),
    ("[64:ff9b::7f00:1]", P),
    ("[2002:7f00:1::]", P),
    ("localhost", P),
    ("LOCALHOST", P),
    ("localhost.", P),
    ("foo.localhost", P),
    ("a.b.c.localhost", P),
    ("0.0.0.0", P),
    ("0", P),
    ("0x0", P),
    ("[::]", P),
    ("[::0]", P),
    // Cloud metadata.
    ("169.254.169.254", P),
    ("2852039166", P),
    ("0xa9fea9fe", P),
    ("0xa9.0xfe.0xa9.0xfe", P),
    ("169.254.43518", P),
    ("169.16689662", P),
    ("[::ffff:169.254.169.254]", P),
    ("[::ffff:a9fe:a9fe]", P),
    ("[64:ff9b::a9fe:a9fe]", P),
    ("metadata", P),
    ("METADATA", P),
    ("metadata.google.internal", P),
    ("METADATA.GOOGLE.INTERNAL.", P),
    ("instance-data", P),
    ("[fd00:ec2::254]", P),
    ("100.100.100.200", P),
    ("169.254.170.2", P),
    ("[fe80::a9fe:a9fe]", P),
    // RFC 1918 and the other special-purpose ranges.
    ("10.0.0.1", P),
    ("10.255.255.255", P),
    ("167772161", P),
    ("0xa000001", P),
    ("10.1", P),
    ("10.0.1", P),
    ("172.16.0.1", P),
    ("172.31.255.255", P),
    ("2886729729", P),
    ("192.168.0.1", P),
    ("192.168.1.1", P),
    ("3232235777", P),
    ("0xc0a80101", P),
    ("192.168.257", P),
    ("100.64.0.1", P),
    ("100.127.255.255", P),
    ("198.18.0.1", P),
    ("198.19.255.255", P),
    ("192.0.0.1", P),
    ("192.0.2.1", P),
    ("198.51.100.1", P),
    ("203.0.113.1", P),
    ("192.88.99.1", P),
    ("224.0.0.1", P),
    ("239.255.255.250", P),
    ("240.0.0.1", P),
    ("255.255.255.255", P),
    ("4294967295", P),
    ("0.1.2.3", P),
    ("[fc00::1]", P),
    ("[fd12:3456::1]", P),
    ("[fe80::1]", P),
    ("[fe80::1%25eth0]", P),
    ("[fec0::1]", P),
    ("[ff02::1]", P),
    ("[ff05::1:3]", P),
    ("[2001:db8::1]", P),
    ("[2001::1]", P),
    ("[100::1]", P),
    ("[::ffff:10.0.0.1]", P),
    ("[::ffff:192.168.0.1]", P),
    ("[::ffff:a00:1]", P),
    ("[64:ff9b::10.0.0.1]", P),
    ("[64:ff9b:1::1]", P),
    ("[2002:a00:1::]", P),
    ("[2002:c0a8:101::1]", P),
    ("[::10.0.0.1]", P),
    ("[FE80::1]", P),
    ("[::FFFF:7F00:1]", P),
    // IPv4-translated (RFC 2765, ::ffff:0:0:0/96) and the rest of ::/8.
    ("[::ffff:0:7f00:1]", P),
    ("[::ffff:0:127.0.0.1]", P),
    ("[::ffff:0:a9fe:a9fe]", P),
    ("[::ffff:0:a00:1]", P),
    ("[::1:0:0:1]", P),
    // Malformed: never a crash, never an allow.
    ("", M),
    ("[", M),
    ("[::1", M),
    ("::1", P),
    ("[::1]x", M),
    ("[127.0.0.1]", M),
    ("[zz::1]", M),
    ("256.1.1.1", M),
    ("1.2.3.4.5", M),
    ("1.2.3.256", M),
    ("0x100000000", M),
    ("4294967296", M),
    ("0xg.1.1.1", M),
    // Confusables: what UTS 46 maps onto a guarded name or address —
    // fullwidth letters and digits, ideographic and fullwidth full stops,
    // mathematical and circled forms. Written as escapes so the file stays
    // readable.
    (
        "\u{ff4c}\u{ff4f}\u{ff43}\u{ff41}\u{ff4c}\u{ff48}\u{ff4f}\u{ff53}\u{ff54}",
        P,
    ),
    ("LocalHost\u{3002}", P),
    ("metadata\u{3002}google\u{3002}internal", P),
    ("metadata\u{ff0e}google\u{ff0e}internal", P),
    ("instance-data\u{ff61}", P),
    ("foo\u{ff0e}localhost", P),
    ("\u{ff11}\u{ff12}\u{ff17}.0.0.1", P),
    ("127\u{3002}0\u{3002}0\u{3002}1", P),
    ("127\u{ff0e}1", P),
    ("169\u{ff0e}254\u{ff0e}169\u{ff0e}254", P),
    ("\u{1d7cf}\u{1d7d0}\u{1d7d5}.0.0.1", P),
    ("\u{2460}\u{2461}\u{2466}.0.0.1", P),
    ("\u{217c}ocalhost", P),
    ("a..b", M),
    ("exa mple.com", M),
    ("foo\u{0}.com", M),
    ("user@example.com", M),
    ("%31%32%37.0.0.1", M),
    ("example.com/path", M),
    ("exa\\mple.com", M),
    ("[::1]:", M),
    ("xn--.com", M),
    ("a.-b.com", M),
    ("a-.com", M),
    ("xn--zz!.com", M),
    ("[fe80::1%25]", M),
    ("[fe80::1%25a/b]", M),
];

fn allow_everything() -> PolicySet {
    let doc = Document::from_yaml(
        r#"policies:
  - policy_id: everything
    priority: 1
    match:
      destination: {hosts: ["*", "0.0.0.0/0", "::/0"]}
    action: allow
"#,
    )
    .expect("valid");
    PolicySet::new(&doc.policy(), &[], "r")
}

fn identity() -> Identity {
    Identity {
        agent_id: "a".into(),
        team_id: String::new(),
        project_id: String::new(),
        environment: String::new(),
        auth_type: AuthType::ApiKey,
    }
}

fn judge(set: &PolicySet, host: &str) -> (bool, String) {
    let authority = format!("{host}:80");
    let Ok(dest) = Destination::parse_authority(&authority, 80) else {
        return (false, M.to_string());
    };
    let id = identity();
    let d = set.evaluate(&RequestFacts {
        identity: &id,
        destination: &dest,
        method: "GET",
        path: "/",
        connect: false,
    });
    (d.allow, d.reason.code().to_string())
}

#[test]
fn every_corpus_host_is_denied_with_its_reason() {
    assert!(CORPUS.len() >= 100, "{} hosts", CORPUS.len());
    let set = allow_everything();
    // The policy does allow public destinations, so a deny below is the
    // guard's (or the parser's), not a missing rule.
    assert_eq!(judge(&set, "example.com"), (true, "policy-allow".into()));
    assert_eq!(judge(&set, "93.184.216.34"), (true, "policy-allow".into()));
    let mut wrong = Vec::new();
    for (host, want) in CORPUS {
        let (allowed, reason) = judge(&set, host);
        if allowed || reason != *want {
            wrong.push(format!(
                "{host:?}: allowed={allowed} reason={reason} (want {want})"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {}:\n{}",
        wrong.len(),
        CORPUS.len(),
        wrong.join("\n")
    );
}
