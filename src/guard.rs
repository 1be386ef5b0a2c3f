//! guard: which target addresses edgepool may connect to. Deny by default: loopback,
//! private, link-local (cloud metadata), CGNAT, multicast, reserved and unspecified
//! addresses, and IPv6 forms that embed them — unless an operator allows a CIDR.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// The target address policy.
#[derive(Clone, Debug, Default)]
pub struct TargetPolicy {
    allow: Vec<IpNet>,
}

impl TargetPolicy {
    /// A policy that refuses special-purpose addresses except those inside `allow`.
    pub fn new(allow: Vec<IpNet>) -> Self {
        TargetPolicy { allow }
    }

    /// `Ok` if edgepool may connect to `ip`; otherwise why not (e.g. "loopback").
    pub fn check(&self, ip: IpAddr) -> Result<(), &'static str> {
        if self.allow.iter().any(|n| n.contains(&ip)) {
            return Ok(());
        }
        match special_purpose(ip) {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }
}

/// Why an address is special-purpose (not a public unicast address), or `None`.
pub fn special_purpose(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => special_v4(v4),
        IpAddr::V6(v6) => special_v6(v6),
    }
}

fn special_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip.is_unspecified() || o[0] == 0 {
        Some("unspecified (0.0.0.0/8)")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private (RFC 1918)")
    } else if ip.is_link_local() {
        Some("link-local / cloud metadata (169.254.0.0/16)")
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        Some("CGNAT (100.64.0.0/10)")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip.is_broadcast() || o[0] >= 240 {
        Some("reserved (240.0.0.0/4)")
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        Some("IETF protocol assignments (192.0.0.0/24)")
    } else if (o[0] == 192 && o[1] == 0 && o[2] == 2)
        || (o[0] == 198 && o[1] == 51 && o[2] == 100)
        || (o[0] == 203 && o[1] == 0 && o[2] == 113)
    {
        Some("documentation range")
    } else if o[0] == 198 && (o[1] & 0xfe) == 18 {
        Some("benchmarking (198.18.0.0/15)")
    } else if o[0] == 192 && o[1] == 88 && o[2] == 99 {
        Some("deprecated 6to4 relay anycast (192.88.99.0/24)")
    } else {
        None
    }
}

/// The IPv4 address in the last 32 bits of `s`.
fn low_v4(s: &[u16; 8]) -> Ipv4Addr {
    Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8)
}

/// IPv6: the IANA IPv6 Special-Purpose Address Registry (RFC 6890 and its updates), checked
/// prefix by prefix, and every form that embeds an IPv4 address (RFC 4291 mapped and
/// compatible, RFC 6145 translated, RFC 6052 NAT64 well-known prefix, RFC 8215 local-use
/// NAT64, RFC 3056 6to4) judged by the IPv4 address it carries.
fn special_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if let Some(v4) = ip.to_ipv4_mapped() {
        // ::ffff:0:0/96 — the IPv4 address itself is what gets dialled.
        return special_v4(v4).map(|_| "IPv4-mapped special-purpose address");
    }
    if ip.is_unspecified() {
        Some("unspecified (::)")
    } else if ip.is_loopback() {
        Some("loopback (::1)")
    } else if s[0..4] == [0, 0, 0, 0] && s[4] == 0xffff && s[5] == 0 {
        // ::ffff:0:0:0/96, RFC 6145 SIIT "IPv4-translated": never routable on the internet.
        Some("IPv4-translated (::ffff:0:0:0/96)")
    } else if s[0..6] == [0, 0, 0, 0, 0, 0] {
        Some("IPv4-compatible (deprecated) address")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if (s[0] & 0xffc0) == 0xfe80 {
        Some("link-local (fe80::/10)")
    } else if (s[0] & 0xffc0) == 0xfec0 {
        Some("site-local (deprecated, fec0::/10)")
    } else if (s[0] & 0xfe00) == 0xfc00 {
        Some("unique local (fc00::/7)")
    } else if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        // NAT64 well-known prefix 64:ff9b::/96 (RFC 6052): the last 32 bits are an IPv4
        // address; public ones are legitimately reached this way on NAT64 networks.
        special_v4(low_v4(&s)).map(|_| "NAT64 form of a special-purpose IPv4 address")
    } else if s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1 {
        Some("local-use NAT64 (64:ff9b:1::/48)")
    } else if s[0] == 0x100 && s[1..4] == [0, 0, 0] {
        Some("discard-only (100::/64)")
    } else if s[0] == 0x100 && s[1..4] == [0, 0, 1] {
        Some("dummy prefix (100:0:0:1::/64)")
    } else if s[0] == 0x2002 {
        // 6to4: bits 16..48 are an IPv4 address.
        let v4 = Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8);
        special_v4(v4).map(|_| "6to4 form of a special-purpose IPv4 address")
    } else if s[0] == 0x2001 && s[1] == 0 {
        Some("Teredo (2001::/32)")
    } else if s[0] == 0x2001 && s[1] == 0xdb8 {
        Some("documentation (2001:db8::/32)")
    } else if s[0] == 0x2001 && s[1] < 0x200 {
        // 2001::/23: IETF protocol assignments (benchmarking 2001:2::/48, ORCHID, AMT, AS112,
        // DETs...): nothing a scraper fetches lives there.
        Some("IETF protocol assignments (2001::/23)")
    } else if s[0] == 0x3fff && (s[1] & 0xf000) == 0 {
        Some("documentation (3fff::/20)")
    } else if s[0] == 0x5f00 {
        Some("SRv6 SIDs (5f00::/16)")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_special_purpose_addresses_and_allows_public_ones() {
        let p = TargetPolicy::default();
        let denied = [
            "127.0.0.1",
            "127.9.9.9",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "224.0.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "240.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::7f00:1",
            "2002:7f00:1::",
            "2001:0:4136:e378::1",
        ];
        for a in denied {
            let ip: IpAddr = a.parse().unwrap();
            assert!(p.check(ip).is_err(), "{a} must be refused");
        }
        let allowed = [
            "93.184.216.34",
            "1.1.1.1",
            "2606:4700::1111",
            "100.128.0.1",
            "172.32.0.1",
            "64:ff9b::808:808",
        ];
        for a in allowed {
            let ip: IpAddr = a.parse().unwrap();
            assert!(p.check(ip).is_ok(), "{a} must be allowed");
        }
    }

    /// The IANA special-purpose registries (IPv4 and IPv6, as of 2025) entry by entry, and every
    /// IPv4-embedding form of a loopback, a private and a public address.
    #[test]
    fn the_special_purpose_registries_and_every_ipv4_embedding_form() {
        let p = TargetPolicy::default();
        // (address, refused?, what)
        let table: &[(&str, bool, &str)] = &[
            // IPv4 registry (RFC 6890 and updates)
            ("0.0.0.1", true, "this network 0.0.0.0/8"),
            ("10.0.0.1", true, "private 10/8"),
            ("100.64.0.1", true, "shared address space 100.64/10"),
            ("127.0.0.1", true, "loopback"),
            ("169.254.169.254", true, "link local"),
            ("172.16.0.1", true, "private 172.16/12"),
            ("192.0.0.8", true, "IETF protocol assignments 192.0.0/24"),
            ("192.0.0.170", true, "NAT64 discovery"),
            ("192.0.2.1", true, "TEST-NET-1"),
            ("192.88.99.1", true, "6to4 relay anycast"),
            ("192.168.0.1", true, "private 192.168/16"),
            ("198.18.0.1", true, "benchmarking"),
            ("198.51.100.1", true, "TEST-NET-2"),
            ("203.0.113.1", true, "TEST-NET-3"),
            ("224.0.0.1", true, "multicast"),
            ("240.0.0.1", true, "reserved"),
            ("255.255.255.255", true, "limited broadcast"),
            ("93.184.216.34", false, "public"),
            // IPv6 registry
            ("::1", true, "loopback"),
            ("::", true, "unspecified"),
            (
                "64:ff9b:1::1",
                true,
                "local-use IPv4/IPv6 translation (RFC 8215)",
            ),
            ("100::1", true, "discard-only"),
            ("100:0:0:1::1", true, "dummy prefix"),
            ("2001::1", true, "Teredo / IETF protocol assignments"),
            ("2001:2::1", true, "benchmarking"),
            ("2001:10::1", true, "ORCHID"),
            ("2001:20::1", true, "ORCHIDv2"),
            ("2001:db8::1", true, "documentation"),
            ("3fff::1", true, "documentation (RFC 9637)"),
            ("3fff:fff::1", true, "documentation (RFC 9637), end"),
            ("5f00::1", true, "SRv6 SIDs"),
            ("fc00::1", true, "unique local"),
            ("fd12:3456::1", true, "unique local"),
            ("fe80::1", true, "link local"),
            ("fec0::1", true, "site local (deprecated)"),
            ("ff02::1", true, "multicast"),
            ("2606:4700::1111", false, "public"),
            ("2001:4860::8888", false, "public (outside 2001::/23)"),
            ("3fff:1000::1", false, "just past 3fff::/20"),
            // IPv4-embedding forms of loopback, private and public addresses
            ("::ffff:127.0.0.1", true, "IPv4-mapped loopback"),
            ("::ffff:10.0.0.1", true, "IPv4-mapped private"),
            (
                "::ffff:8.8.8.8",
                false,
                "IPv4-mapped public (dials 8.8.8.8)",
            ),
            (
                "::ffff:0:127.0.0.1",
                true,
                "IPv4-translated loopback (RFC 6145)",
            ),
            ("::ffff:0:8.8.8.8", true, "IPv4-translated: never routable"),
            ("::127.0.0.1", true, "IPv4-compatible loopback"),
            ("::8.8.8.8", true, "IPv4-compatible (deprecated)"),
            (
                "64:ff9b::127.0.0.1",
                true,
                "NAT64 well-known prefix, loopback",
            ),
            (
                "64:ff9b::10.0.0.1",
                true,
                "NAT64 well-known prefix, private",
            ),
            ("64:ff9b::8.8.8.8", false, "NAT64 well-known prefix, public"),
            (
                "64:ff9b:1::8.8.8.8",
                true,
                "local-use NAT64, whatever it embeds",
            ),
            ("2002:7f00:1::1", true, "6to4 of loopback"),
            ("2002:a00:1::1", true, "6to4 of private"),
            ("2002:808:808::1", false, "6to4 of public"),
        ];
        for (addr, refused, what) in table {
            let ip: IpAddr = addr.parse().unwrap_or_else(|_| panic!("{addr}"));
            assert_eq!(
                p.check(ip).is_err(),
                *refused,
                "{addr} ({what}): {:?}",
                p.check(ip)
            );
        }
    }

    #[test]
    fn allow_list_opens_a_cidr_and_nothing_else() {
        let p = TargetPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]);
        assert!(p.check("127.0.0.1".parse().unwrap()).is_ok());
        assert!(p.check("10.0.0.1".parse().unwrap()).is_err());
        assert_eq!(
            p.check("169.254.169.254".parse().unwrap()),
            Err("link-local / cloud metadata (169.254.0.0/16)")
        );
    }
}
