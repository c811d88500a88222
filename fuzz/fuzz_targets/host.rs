//! The destination parser: any authority an agent can send. Never a
//! panic; a name it accepts is already normal (parsing it again gives the
//! same host), and an IP it accepts is judged the same when written out.
#![no_main]

use clawgress_policy::destination::Host;
use clawgress_policy::Destination;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Destination::parse_authority(s, 443);
    if let Ok(h) = Destination::parse_host(s) {
        let again = match &h {
            Host::Name(n) => Destination::parse_host(n),
            Host::Ip(std::net::IpAddr::V4(v4)) => Destination::parse_host(&v4.to_string()),
            Host::Ip(std::net::IpAddr::V6(v6)) => Destination::parse_host(&format!("[{v6}]")),
        };
        assert_eq!(
            again.as_ref(),
            Ok(&h),
            "{s:?} normalised to {h:?} does not parse back"
        );
    }
});
