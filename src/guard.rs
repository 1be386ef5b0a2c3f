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
    } else {
        None
    }
}

fn special_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if let Some(v4) = ip.to_ipv4_mapped() {
        return special_v4(v4).map(|_| "IPv4-mapped special-purpose address");
    }
    if ip.is_unspecified() {
        Some("unspecified (::)")
    } else if ip.is_loopback() {
        Some("loopback (::1)")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if (s[0] & 0xffc0) == 0xfe80 {
        Some("link-local (fe80::/10)")
    } else if (s[0] & 0xfe00) == 0xfc00 {
        Some("unique local (fc00::/7)")
    } else if s[0] == 0x64 && s[1] == 0xff9b {
        // NAT64: the last 32 bits are an IPv4 address.
        let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
        special_v4(v4).map(|_| "NAT64 form of a special-purpose IPv4 address")
    } else if s[0] == 0x2002 {
        // 6to4: bits 16..48 are an IPv4 address.
        let v4 = Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8);
        special_v4(v4).map(|_| "6to4 form of a special-purpose IPv4 address")
    } else if s[0] == 0x2001 && s[1] == 0 {
        Some("Teredo (2001::/32)")
    } else if s[0] == 0x2001 && s[1] == 0xdb8 {
        Some("documentation (2001:db8::/32)")
    } else if s[0..6] == [0, 0, 0, 0, 0, 0] {
        Some("IPv4-compatible (deprecated) address")
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
