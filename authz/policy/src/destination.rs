//! Destination hosts as HTTP clients see them, and the private-address guard.
//!
//! Rust's `Ipv4Addr` parser accepts only dotted quads, but curl, browsers and
//! most HTTP stacks also accept `127.1`, `0x7f.1`, `2130706433` (inet_aton /
//! WHATWG host rules). A gateway that parses hosts more strictly than its
//! clients lets those forms through as "names" that then resolve to loopback.
//! So hosts are parsed the way clients parse them, and the forms whose
//! meaning differs between clients (a leading zero: octal to inet_aton,
//! decimal to others) are refused rather than guessed (DESIGN.md §4, §10).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// A normalised destination host.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// Lower case, no trailing dot, IDNA-encoded (punycode).
    Name(String),
    Ip(IpAddr),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub host: Host,
    pub port: u16,
    /// False for an IPv4 literal spelled other than as a dotted quad
    /// (`127.1`, `2130706433`, `0x7f.1`, a trailing dot): such a string is
    /// an address to HTTP clients but a name to Envoy's resolver, so it is
    /// never forwarded.
    pub canonical: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DestinationError {
    #[error("empty host")]
    Empty,
    #[error("malformed host: {0}")]
    Malformed(&'static str),
    #[error(
        "ambiguous IP literal (a leading zero reads as octal to some clients, decimal to others)"
    )]
    AmbiguousIp,
    #[error("malformed port")]
    BadPort,
}

impl Destination {
    /// Parse an HTTP authority (`host`, `host:port`, `[v6]:port`).
    /// `default_port` applies when the authority names none.
    pub fn parse_authority(
        authority: &str,
        default_port: u16,
    ) -> Result<Destination, DestinationError> {
        if authority.is_empty() {
            return Err(DestinationError::Empty);
        }
        if authority.contains('@') {
            return Err(DestinationError::Malformed("userinfo in authority"));
        }
        let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
            let (inside, after) = rest
                .split_once(']')
                .ok_or(DestinationError::Malformed("unclosed '['"))?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or(DestinationError::BadPort)?),
            };
            (&authority[..inside.len() + 2], port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        let port = match port {
            None => default_port,
            Some(p) => parse_port(p)?,
        };
        let parsed = Destination::parse_host(host)?;
        let canonical = match &parsed {
            // Envoy parses no zone id: `[::1%lo]` would go to its resolver
            // as a name (an agent-chosen DNS query), never as the address.
            Host::Ip(_) if host.starts_with('[') => !host.contains('%'),
            Host::Ip(IpAddr::V4(v4)) => host == v4.to_string(),
            _ => true,
        };
        Ok(Destination {
            host: parsed,
            port,
            canonical,
        })
    }

    /// Parse and normalise a bare host (brackets allowed around IPv6).
    pub fn parse_host(host: &str) -> Result<Host, DestinationError> {
        if host.is_empty() {
            return Err(DestinationError::Empty);
        }
        if let Some(inner) = host.strip_prefix('[') {
            let inner = inner
                .strip_suffix(']')
                .ok_or(DestinationError::Malformed("unclosed '['"))?;
            // A zone id (RFC 6874: `fe80::1%25eth0`) names an interface,
            // not another address: judged by the address.
            let inner = match inner.split_once('%') {
                Some((addr, zone)) => {
                    let zone = zone.strip_prefix("25").unwrap_or(zone);
                    let ok = !zone.is_empty()
                        && zone
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"._~-".contains(&b));
                    if !ok {
                        return Err(DestinationError::Malformed("bad IPv6 zone id"));
                    }
                    addr
                }
                None => inner,
            };
            return inner
                .parse::<Ipv6Addr>()
                .map(|ip| Host::Ip(canonical_ip(IpAddr::V6(ip))))
                .map_err(|_| DestinationError::Malformed("bad IPv6 literal"));
        }
        if host.contains(':') {
            return host
                .parse::<Ipv6Addr>()
                .map(|ip| Host::Ip(canonical_ip(IpAddr::V6(ip))))
                .map_err(|_| DestinationError::Malformed("':' outside an IPv6 literal"));
        }
        let name = normalise_name(host)?;
        if ends_in_number(&name) {
            return parse_ipv4_like_clients(&name).map(|ip| Host::Ip(IpAddr::V4(ip)));
        }
        Ok(Host::Name(name))
    }
}

fn parse_port(p: &str) -> Result<u16, DestinationError> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(DestinationError::BadPort);
    }
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(DestinationError::BadPort),
        Ok(n) => Ok(n),
    }
}

/// Lower case, one trailing dot removed, IDNA (UTS #46) to punycode, and only
/// LDH characters (plus `_`, which real-world names carry) left.
pub fn normalise_name(host: &str) -> Result<String, DestinationError> {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() {
        return Err(DestinationError::Empty);
    }
    let ascii = if host.is_ascii() {
        host.to_ascii_lowercase()
    } else {
        let mapped =
            idna::domain_to_ascii(host).map_err(|_| DestinationError::Malformed("invalid IDN"))?;
        // A trailing ideographic or fullwidth full stop maps to '.': the
        // same one trailing dot as above, named the same way.
        match mapped.strip_suffix('.') {
            Some(m) if !host.ends_with('.') => m.to_string(),
            _ => mapped,
        }
    };
    if ascii.len() > 253 {
        return Err(DestinationError::Malformed("name longer than 253 bytes"));
    }
    for label in ascii.split('.') {
        if label.is_empty() {
            return Err(DestinationError::Malformed("empty label"));
        }
        if label.len() > 63 {
            return Err(DestinationError::Malformed("label longer than 63 bytes"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(DestinationError::Malformed(
                "character not allowed in a host",
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(DestinationError::Malformed(
                "a label starts or ends with '-'",
            ));
        }
    }
    // Punycode labels must decode (`xn--` alone, or garbage after it, is
    // not a name any resolver should be asked about).
    if ascii.split('.').any(|l| l.starts_with("xn--")) && idna::domain_to_unicode(&ascii).1.is_err()
    {
        return Err(DestinationError::Malformed("invalid punycode label"));
    }
    Ok(ascii)
}

/// WHATWG "ends in a number": the last label is all digits or `0x` hex.
/// Such a host is an IPv4 address or invalid, never a name.
fn ends_in_number(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    if !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()) {
        return true;
    }
    match last.strip_prefix("0x") {
        Some(h) => h.bytes().all(|b| b.is_ascii_hexdigit()),
        None => false,
    }
}

/// IPv4 the way clients read it: 1–4 parts, decimal or `0x` hex, the last
/// part filling the remaining bytes. Octal (leading zero) is refused.
fn parse_ipv4_like_clients(name: &str) -> Result<Ipv4Addr, DestinationError> {
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() > 4 {
        return Err(DestinationError::Malformed("more than four IPv4 parts"));
    }
    let mut nums = Vec::with_capacity(parts.len());
    for p in &parts {
        let n = if let Some(h) = p.strip_prefix("0x") {
            if h.is_empty() {
                // "0x" alone is 0 to WHATWG and an error to inet_aton.
                return Err(DestinationError::AmbiguousIp);
            }
            u64::from_str_radix(h, 16).map_err(|_| DestinationError::Malformed("bad IPv4 part"))?
        } else {
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(DestinationError::Malformed("bad IPv4 part"));
            }
            if p.len() > 1 && p.starts_with('0') {
                return Err(DestinationError::AmbiguousIp);
            }
            p.parse::<u64>()
                .map_err(|_| DestinationError::Malformed("IPv4 part out of range"))?
        };
        nums.push(n);
    }
    let (last, init) = nums
        .split_last()
        .ok_or(DestinationError::Malformed("bad IPv4 part"))?;
    if init.iter().any(|n| *n > 255) {
        return Err(DestinationError::Malformed("IPv4 part out of range"));
    }
    let last_bits = 8 * (5 - nums.len() as u32);
    if *last >= 1u64 << last_bits {
        return Err(DestinationError::Malformed("IPv4 part out of range"));
    }
    let mut addr: u64 = *last;
    for (i, n) in init.iter().enumerate() {
        addr |= n << (24 - 8 * i as u32);
    }
    Ok(Ipv4Addr::from(addr as u32))
}

/// IPv4-mapped IPv6 addresses become the IPv4 they carry, so policies and
/// logs see one spelling of each address.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

/// Names denied whatever they resolve to.
pub fn is_guarded_name(name: &str) -> bool {
    matches!(
        name,
        "localhost" | "metadata" | "metadata.google.internal" | "instance-data"
    ) || name.ends_with(".localhost")
}

const GUARDED_V4: &[(u8, u8, u8, u8, u8)] = &[
    (0, 0, 0, 0, 8),
    (10, 0, 0, 0, 8),
    (100, 64, 0, 0, 10),
    (127, 0, 0, 0, 8),
    (169, 254, 0, 0, 16),
    (172, 16, 0, 0, 12),
    (192, 0, 0, 0, 24),
    (192, 0, 2, 0, 24),
    (192, 88, 99, 0, 24),
    (192, 168, 0, 0, 16),
    (198, 18, 0, 0, 15),
    (198, 51, 100, 0, 24),
    (203, 0, 113, 0, 24),
    (224, 0, 0, 0, 4),
    (240, 0, 0, 0, 4),
];

/// Addresses, not text: `guarded_range` runs on every Check of an IPv6
/// literal, and parses nothing.
const fn v6(a: u16, b: u16, c: u16) -> Ipv6Addr {
    Ipv6Addr::new(a, b, c, 0, 0, 0, 0, 0)
}

const GUARDED_V6: &[(Ipv6Addr, u8)] = &[
    (v6(0x100, 0, 0), 64),
    (v6(0x2001, 0, 0), 32),
    (v6(0x2001, 0xdb8, 0), 32),
    (v6(0xfc00, 0, 0), 7),
    (v6(0xfe80, 0, 0), 10),
    (v6(0xfec0, 0, 0), 10),
    (v6(0xff00, 0, 0), 8),
    // Local-use NAT64 prefix (RFC 8215): where the IPv4 sits depends on the
    // operator's prefix length, so the whole prefix is guarded.
    (v6(0x64, 0xff9b, 1), 48),
];

/// IPv6's own unspecified and loopback addresses: each its own range, so
/// only a policy naming it opens it (the kernel's list covers both in
/// `::/96`).
const UNSPECIFIED_V6: (Ipv6Addr, u8) = (Ipv6Addr::UNSPECIFIED, 128);
const LOOPBACK_V6: (Ipv6Addr, u8) = (Ipv6Addr::LOCALHOST, 128);

/// Reserved by the IETF and never global unicast (odd forms such as
/// `::1:0:0:1`); asked only after the forms that embed an IPv4
/// address were judged by it. Not in the kernel's list: it holds
/// `64:ff9b::/96`, where a NAT64 network's public IPv4 hosts live.
const RESERVED_V6: (Ipv6Addr, u8) = (Ipv6Addr::UNSPECIFIED, 8);

/// Every guarded range as a CIDR, for the kernel's rules (§8: Envoy's own
/// egress to these is dropped in `proxy-only`). IPv6 forms that embed an
/// IPv4 address are covered where the kernel sees them: IPv4-mapped
/// addresses leave as IPv4 packets; `::/96` (compat, `::1`, `::`) is listed.
pub fn guarded_ranges() -> Vec<IpNet> {
    let mut v: Vec<IpNet> = GUARDED_V4
        .iter()
        .filter_map(|&(a, b, c, d, len)| {
            Ipv4Net::new(Ipv4Addr::new(a, b, c, d), len)
                .ok()
                .map(IpNet::V4)
        })
        .collect();
    v.extend(
        GUARDED_V6
            .iter()
            .copied()
            .chain([
                (Ipv6Addr::UNSPECIFIED, 96),
                (Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0), 96),
                (Ipv6Addr::new(0, 0, 0, 0, 0xffff, 0, 0, 0), 96),
            ])
            .filter_map(|(a, len)| Ipv6Net::new(a, len).ok().map(IpNet::V6)),
    );
    v
}

/// The IANA special-purpose range that contains `ip`, if any (DESIGN.md §4).
///
/// IPv6 forms that embed an IPv4 address (`::ffff:0:0/96`, `::/96`,
/// `::ffff:0:0:0/96`, `64:ff9b::/96`, `2002::/16`) are judged by that address, and the range
/// returned is the IPv4 one: only an IPv4 policy CIDR inside it can open
/// such a destination, never an IPv6 CIDR over the embedding block (which
/// would otherwise open every embedded loopback and metadata address).
pub fn guarded_range(ip: IpAddr) -> Option<IpNet> {
    match ip {
        IpAddr::V4(v4) => guarded_v4(v4).map(IpNet::V4),
        IpAddr::V6(v6) => {
            if let Some(v4) = embedded_v4(v6) {
                return guarded_v4(v4).map(IpNet::V4);
            }
            GUARDED_V6
                .iter()
                .chain(&[UNSPECIFIED_V6, LOOPBACK_V6, RESERVED_V6])
                .find_map(|&(a, len)| {
                    let net = Ipv6Net::new(a, len).ok()?;
                    net.contains(&v6).then_some(IpNet::V6(net))
                })
        }
    }
}

/// The IPv4 address an IPv6 address embeds, if it is of such a form.
pub fn embedded_ipv4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V6(v6) => embedded_v4(v6),
        IpAddr::V4(_) => None,
    }
}

fn guarded_v4(ip: Ipv4Addr) -> Option<Ipv4Net> {
    GUARDED_V4.iter().find_map(|&(a, b, c, d, len)| {
        let net = Ipv4Net::new(Ipv4Addr::new(a, b, c, d), len).ok()?;
        net.contains(&ip).then_some(net)
    })
}

fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    // `::` and `::1` are IPv6's own unspecified and loopback addresses, not
    // IPv4-compatible ones: judged (and opened by a policy) as IPv6.
    let own = s[..7] == [0; 7] && s[7] <= 1;
    if s[..5] == [0, 0, 0, 0, 0] && (s[5] == 0 && !own || s[5] == 0xffff) {
        return Some(low); // ::/96 compatible and ::ffff:0:0/96 mapped
    }
    if s[..4] == [0, 0, 0, 0] && s[4] == 0xffff && s[5] == 0 {
        return Some(low); // ::ffff:0:0:0/96 IPv4-translated (RFC 2765, SIIT)
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(low); // 64:ff9b::/96 NAT64
    }
    if s[0] == 0x2002 {
        // 6to4: the IPv4 address is bits 16..48.
        return Some(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(s: &str) -> Result<Host, DestinationError> {
        Destination::parse_host(s)
    }

    fn ip(s: &str) -> Host {
        Host::Ip(s.parse().expect("test ip"))
    }

    #[test]
    fn ipv4_in_every_client_encoding() {
        for form in [
            "127.0.0.1",
            "127.1",
            "127.0.1",
            "2130706433",
            "0x7f.1",
            "0x7f000001",
            "0x7F.0.0.1",
        ] {
            assert_eq!(host(form), Ok(ip("127.0.0.1")), "{form}");
        }
        assert_eq!(host("169.254.169.254."), Ok(ip("169.254.169.254")));
        assert_eq!(host("[::ffff:127.0.0.1]"), Ok(ip("127.0.0.1")));
        assert_eq!(host("[::ffff:7f00:1]"), Ok(ip("127.0.0.1")));
    }

    #[test]
    fn ambiguous_and_malformed_are_errors() {
        assert_eq!(host("0177.0.0.1"), Err(DestinationError::AmbiguousIp));
        assert_eq!(host("127.0.0.01"), Err(DestinationError::AmbiguousIp));
        assert_eq!(host("0x.1"), Err(DestinationError::AmbiguousIp));
        for bad in [
            "1.2.3.4.5",
            "256.1.1.1",
            "1.2.3.256",
            "1.16777216",
            "example.123",
            "a..b",
            "exa mple.com",
            "ex%41mple.com",
            "[::1",
            "::zz",
            "",
            ".",
            "4294967296",
        ] {
            assert!(host(bad).is_err(), "{bad} should fail: {:?}", host(bad));
        }
    }

    #[test]
    fn names_are_normalised() {
        assert_eq!(host("PyPI.Org."), Ok(Host::Name("pypi.org".into())));
        assert_eq!(
            host("bücher.example"),
            Ok(Host::Name("xn--bcher-kva.example".into()))
        );
        assert_eq!(
            host("_acme.example.com"),
            Ok(Host::Name("_acme.example.com".into()))
        );
    }

    #[test]
    fn only_dotted_quads_are_canonical() {
        let c = |a: &str| Destination::parse_authority(a, 80).map(|d| d.canonical);
        assert_eq!(c("127.0.0.1:80"), Ok(true));
        assert_eq!(c("example.com"), Ok(true));
        assert_eq!(c("[::1]:80"), Ok(true));
        assert_eq!(c("[::ffff:127.0.0.1]:80"), Ok(true));
        for a in [
            "127.1",
            "2130706433",
            "0x7f.1",
            "127.0.0.1.",
            "1.0x7f",
            "[::ffff:127.0.0.1%lo]:80",
            "[fe80::1%25eth0]",
            "[2606:4700::1111%eth0]",
        ] {
            assert_eq!(c(a), Ok(false), "{a}");
        }
    }

    #[test]
    fn authority_ports() {
        let d = Destination::parse_authority("Example.com:8443", 80).expect("ok");
        assert_eq!((d.host, d.port), (Host::Name("example.com".into()), 8443));
        let d = Destination::parse_authority("[::1]:443", 80).expect("ok");
        assert_eq!((d.host, d.port), (ip("::1"), 443));
        assert_eq!(
            Destination::parse_authority("example.com", 80).map(|d| d.port),
            Ok(80)
        );
        for bad in [
            "example.com:",
            "example.com:0",
            "example.com:65536",
            "example.com:+80",
            "u@example.com",
            "[::1]x",
        ] {
            assert!(Destination::parse_authority(bad, 80).is_err(), "{bad}");
        }
    }

    #[test]
    fn guarded_ranges() {
        for g in [
            "0.0.0.0",
            "10.1.2.3",
            "100.64.0.1",
            "127.0.0.1",
            "169.254.169.254",
            "172.31.255.255",
            "192.0.0.8",
            "192.0.2.1",
            "192.88.99.1",
            "192.168.1.1",
            "198.19.0.1",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "100::1",
            "2001::1",
            "2001:db8::1",
            "fd00::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "::127.0.0.1",
            "::ffff:0:7f00:1",
            "::ffff:0:a9fe:a9fe",
            "::ffff:0:10.0.0.1",
            "::1:0:0:1",
            "::ffff:0:0:1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
            "64:ff9b:1::1",
        ] {
            let a: IpAddr = g.parse().expect("test ip");
            assert!(guarded_range(a).is_some(), "{g} should be guarded");
        }
        for p in [
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700::1111",
            "64:ff9b::808:808",
            "2002:808:808::",
            "::8.8.8.8",
            "::ffff:0:808:808",
        ] {
            let a: IpAddr = p.parse().expect("test ip");
            assert!(guarded_range(a).is_none(), "{p} should be public");
        }
    }

    #[test]
    fn guarded_names() {
        for n in [
            "localhost",
            "a.localhost",
            "metadata",
            "metadata.google.internal",
            "instance-data",
        ] {
            assert!(is_guarded_name(n), "{n}");
        }
        assert!(!is_guarded_name("notlocalhost"));
    }
}
