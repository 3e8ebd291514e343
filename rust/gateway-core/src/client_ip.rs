//! The real client address behind reverse proxies, from `X-Forwarded-For` and `X-Real-IP`,
//! believed only when the socket's peer is a proxy the operator listed as trusted.
//!
//! The rules ([`forwarded_client`]), in the spirit of nginx's `real_ip_recursive on`:
//! - a peer that is not trusted is the client; whatever headers it sent are ignored,
//!   so a client cannot pick its own address (per-IP limits, logs, bans);
//! - from a trusted peer, `X-Forwarded-For` is read right to left (each proxy appends the
//!   address it received the request from, so the rightmost entry is the closest hop),
//!   skipping trusted addresses; the first untrusted one is the client. If every entry
//!   is trusted, the leftmost is;
//! - with no `X-Forwarded-For`, or an entry that is not an address where the walk stops
//!   (`unknown`, `_hidden`, garbage), `X-Real-IP` is used if there is exactly one and it
//!   is an address, else the peer.
//!
//! `X-Real-IP` is taken as is, so it is only as good as the trusted proxy that sets it:
//! a proxy that passes the client's own `X-Real-IP` through lets a client choose its
//! address whenever the walk falls back to it. nginx's `proxy_set_header X-Real-IP
//! $remote_addr` overwrites it.
//!
//! Every address returned is in canonical form: IPv4-mapped IPv6 addresses
//! (`::ffff:a.b.c.d`) as IPv4 ([`crate::limits::canonical`]), also for the peer.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::limits::canonical;

/// One CIDR block, its address masked to the prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Net {
    addr: IpAddr,
    prefix: u8,
}

impl Net {
    fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => u32::from(a) & mask4(self.prefix) == u32::from(n),
            (IpAddr::V6(n), IpAddr::V6(a)) => u128::from(a) & mask6(self.prefix) == u128::from(n),
            _ => false,
        }
    }
}

fn mask4(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask6(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

/// The proxies whose forwarding headers are believed: a list of CIDR blocks.
/// Empty (the default) trusts no one, and every client is its socket's peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    nets: Vec<Net>,
}

impl TrustedProxies {
    /// Parse CIDR blocks (`10.0.0.0/8`, `2001:db8::/32`) and bare addresses (`10.0.0.7` =
    /// `/32`, `::1` = `/128`); surrounding whitespace is ignored. IPv4-mapped IPv6 blocks
    /// (`::ffff:10.0.0.0/104`) mean the IPv4 block. Refused, with the entry named in the
    /// error: anything that is not an address, a prefix past the family's width, and host
    /// bits set past the prefix (`10.0.0.1/8` is ambiguous in a trust list: `10.0.0.0/8`
    /// or `10.0.0.1/32`?).
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        let nets = entries
            .iter()
            .map(|e| parse_net(e.trim()).map_err(|why| format!("trusted proxy {e:?}: {why}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { nets })
    }

    /// Whether `ip` is in one of the blocks. An IPv4-mapped IPv6 address counts as its
    /// IPv4 address (and is also matched against IPv6 blocks such as `::/0`).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        let mapped = match ip {
            IpAddr::V4(a) => Some(IpAddr::V6(a.to_ipv6_mapped())),
            IpAddr::V6(_) => None,
        };
        self.nets.iter().any(|n| n.contains(ip) || mapped.is_some_and(|m| n.contains(m)))
    }

    /// No proxy is trusted.
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }
}

fn parse_net(s: &str) -> Result<Net, String> {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| "not an IP address or CIDR block".to_owned())?;
    let width: u8 = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => width,
        Some(p) if !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()) => {
            p.parse::<u8>().ok().filter(|&n| n <= width).ok_or(format!("prefix length over {width}"))?
        }
        Some(_) => return Err("prefix length is not a number".to_owned()),
    };
    let net = match addr {
        IpAddr::V6(a) if prefix >= 96 && a.to_ipv4_mapped().is_some() => {
            Net { addr: canonical(addr), prefix: prefix - 96 }
        }
        _ => Net { addr, prefix },
    };
    let masked = match net.addr {
        IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask4(net.prefix))),
        IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask6(net.prefix))),
    };
    if masked != net.addr {
        return Err(format!("host bits set past the prefix (the block is {masked}/{})", net.prefix));
    }
    Ok(net)
}

/// One address of a forwarding header: `1.2.3.4`, `2001:db8::1`, and with a port,
/// `1.2.3.4:5678`, `[2001:db8::1]:80`, or bracketed, `[2001:db8::1]`. Canonical form.
fn parse_addr(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    let ip = s
        .parse::<IpAddr>()
        .ok()
        .or_else(|| s.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| s.strip_prefix('[')?.strip_suffix(']')?.parse::<Ipv6Addr>().ok().map(IpAddr::V6))?;
    Some(canonical(ip))
}

/// The values of header `name` (compared case-insensitively), in arrival order.
fn values<'a>(headers: &'a [(String, String)], name: &'a str) -> impl DoubleEndedIterator<Item = &'a str> + 'a {
    headers.iter().filter(move |(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// The client's address for a request that arrived from `peer` with `headers`, by the
/// rules in the module documentation: `peer` itself unless it is a trusted proxy, else
/// the first untrusted `X-Forwarded-For` entry from the right, else the leftmost
/// entry if all are trusted, else `X-Real-IP`, else `peer`. Canonical form.
pub fn forwarded_client(headers: &[(String, String)], peer: IpAddr, trusted: &TrustedProxies) -> IpAddr {
    let peer = canonical(peer);
    if !trusted.contains(peer) {
        return peer;
    }
    // All occurrences, comma-separated, in order; empty list elements are allowed
    // (RFC 9110 §5.6.1) and skipped.
    let entries =
        values(headers, "x-forwarded-for").flat_map(|v| v.split(',')).map(str::trim).filter(|e| !e.is_empty());
    let mut leftmost = None;
    for entry in entries.rev() {
        match parse_addr(entry) {
            Some(ip) if trusted.contains(ip) => leftmost = Some(ip),
            Some(ip) => return ip,
            None => {
                leftmost = None;
                break;
            }
        }
    }
    if let Some(ip) = leftmost {
        return ip;
    }
    let mut real = values(headers, "x-real-ip");
    match (real.next(), real.next()) {
        (Some(v), None) => parse_addr(v).unwrap_or(peer),
        _ => peer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn trusted(list: &[&str]) -> TrustedProxies {
        TrustedProxies::parse(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn hdrs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// The load balancers of the tests: 10.0.0.0/8 and 2001:db8:ffff::/48.
    fn lbs() -> TrustedProxies {
        trusted(&["10.0.0.0/8", "2001:db8:ffff::/48", "127.0.0.1"])
    }

    #[test]
    fn parses_cidr_lists() {
        let t = trusted(&["10.0.0.0/8", " 192.168.1.7 ", "::1", "2001:db8::/32", "::ffff:172.16.0.0/108"]);
        assert!(!t.is_empty());
        for yes in ["10.0.0.0", "10.255.255.255", "192.168.1.7", "::1", "2001:db8:1::5", "172.31.0.1"] {
            assert!(t.contains(ip(yes)), "{yes}");
        }
        for no in ["11.0.0.0", "9.255.255.255", "192.168.1.8", "::2", "2001:db9::", "172.32.0.1", "0.0.0.1"] {
            assert!(!t.contains(ip(no)), "{no}");
        }
        assert!(TrustedProxies::parse(&[]).unwrap().is_empty());
        assert!(!TrustedProxies::default().contains(ip("127.0.0.1")));
        let all = trusted(&["0.0.0.0/0", "::/0"]);
        assert!(all.contains(ip("8.8.8.8")) && all.contains(ip("2606:4700::1")));
    }

    #[test]
    fn ipv4_mapped_peers_match_ipv4_blocks() {
        let t = trusted(&["10.0.0.0/8"]);
        assert!(t.contains(ip("::ffff:10.1.2.3")));
        assert!(!t.contains(ip("::ffff:11.1.2.3")));
        assert!(!t.contains(ip("::a01:203")), "IPv4-compatible (not mapped) is IPv6");
        let v6_all = trusted(&["::/0"]);
        assert!(v6_all.contains(ip("::ffff:10.1.2.3")) && v6_all.contains(ip("10.1.2.3")));
        assert!(v6_all.contains(ip("2001:db8::1")));
        let mapped = trusted(&["::ffff:10.0.0.1"]);
        assert!(mapped.contains(ip("10.0.0.1")) && !mapped.contains(ip("10.0.0.2")));
    }

    #[test]
    fn bad_entries_are_named() {
        for (bad, why) in [
            ("10.0.0.0/33", "over 32"),
            ("::/129", "over 128"),
            ("10.0.0.0/", "not a number"),
            ("10.0.0.0/+8", "not a number"),
            ("10.0.0.0/0008", "not a number"),
            ("10.0.0.1/8", "10.0.0.0/8"),
            ("2001:db8::1/32", "2001:db8::/32"),
            ("10.0.0.300", "not an IP"),
            ("/8", "not an IP"),
            ("", "not an IP"),
            ("localhost", "not an IP"),
            ("[::1]", "not an IP"),
            ("10.0.0.0/8/8", "not a number"),
        ] {
            let err = TrustedProxies::parse(&["127.0.0.1".to_owned(), bad.to_owned()]).unwrap_err();
            assert!(err.contains(&format!("{bad:?}")) && err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn untrusted_peer_is_the_client_whatever_it_sends() {
        let spoof = hdrs(&[("x-forwarded-for", "1.2.3.4"), ("x-real-ip", "5.6.7.8")]);
        assert_eq!(forwarded_client(&spoof, ip("203.0.113.9"), &lbs()), ip("203.0.113.9"));
        assert_eq!(forwarded_client(&spoof, ip("10.0.0.2"), &TrustedProxies::default()), ip("10.0.0.2"));
        // The peer comes back canonical.
        assert_eq!(forwarded_client(&spoof, ip("::ffff:203.0.113.9"), &lbs()), ip("203.0.113.9"));
    }

    #[test]
    fn trusted_peer_rightmost_untrusted_entry_wins() {
        let t = lbs();
        let c = |h: &[(&str, &str)], peer: &str| forwarded_client(&hdrs(h), ip(peer), &t);
        assert_eq!(c(&[("x-forwarded-for", "198.51.100.7")], "10.0.0.2"), ip("198.51.100.7"));
        // A client sent its own XFF; the load balancer appended the real address.
        assert_eq!(c(&[("x-forwarded-for", "6.6.6.6, 198.51.100.7")], "10.0.0.2"), ip("198.51.100.7"));
        // Through a chain of trusted proxies.
        assert_eq!(
            c(&[("x-forwarded-for", "6.6.6.6, 198.51.100.7, 10.0.0.9, 10.3.3.3")], "10.0.0.2"),
            ip("198.51.100.7")
        );
        // Every occurrence, in order: the second header continues the list.
        let two = [("x-forwarded-for", "6.6.6.6, 198.51.100.7"), ("x-forwarded-for", "10.0.0.9")];
        assert_eq!(c(&two, "10.0.0.2"), ip("198.51.100.7"));
        // Header names in any case; a trusted IPv4-mapped peer.
        assert_eq!(c(&[("X-Forwarded-For", "198.51.100.7, 10.0.0.9")], "::ffff:10.0.0.2"), ip("198.51.100.7"));
        // X-Real-IP is not consulted when XFF names the client.
        assert_eq!(c(&[("x-real-ip", "5.6.7.8"), ("x-forwarded-for", "198.51.100.7")], "10.0.0.2"), ip("198.51.100.7"));
        // IPv6 load balancer, IPv6 client.
        assert_eq!(c(&[("x-forwarded-for", "2001:db8:1::42")], "2001:db8:ffff::1"), ip("2001:db8:1::42"));
    }

    #[test]
    fn entries_with_ports_whitespace_and_mapped_addresses() {
        let t = lbs();
        let c = |xff: &str| forwarded_client(&hdrs(&[("x-forwarded-for", xff)]), ip("10.0.0.2"), &t);
        assert_eq!(c(" 198.51.100.7:5678 ,10.0.0.9:80"), ip("198.51.100.7"));
        assert_eq!(c("[2001:db8:1::42]:443"), ip("2001:db8:1::42"));
        assert_eq!(c("[2001:db8:1::42]"), ip("2001:db8:1::42"));
        assert_eq!(c("\t198.51.100.7\t"), ip("198.51.100.7"));
        assert_eq!(c("198.51.100.7,, ,10.0.0.9"), ip("198.51.100.7"), "empty list elements are skipped");
        assert_eq!(c("::ffff:198.51.100.7, ::ffff:10.0.0.9"), ip("198.51.100.7"), "mapped: canonical, trusted");
    }

    #[test]
    fn all_trusted_gives_the_leftmost() {
        let t = lbs();
        let h = hdrs(&[("x-forwarded-for", "10.1.1.1, 10.2.2.2"), ("x-real-ip", "5.6.7.8")]);
        assert_eq!(forwarded_client(&h, ip("10.0.0.2"), &t), ip("10.1.1.1"));
        let h = hdrs(&[("x-forwarded-for", "127.0.0.1")]);
        assert_eq!(forwarded_client(&h, ip("127.0.0.1"), &t), ip("127.0.0.1"));
    }

    #[test]
    fn falls_back_to_x_real_ip_then_the_peer() {
        let t = lbs();
        let c = |h: &[(&str, &str)]| forwarded_client(&hdrs(h), ip("10.0.0.2"), &t);
        // No XFF.
        assert_eq!(c(&[("X-Real-IP", "198.51.100.7")]), ip("198.51.100.7"));
        assert_eq!(c(&[("x-real-ip", "[2001:db8:1::42]:80")]), ip("2001:db8:1::42"));
        assert_eq!(c(&[]), ip("10.0.0.2"));
        assert_eq!(c(&[("x-forwarded-for", " , ")]), ip("10.0.0.2"), "XFF with no entry is absent");
        // The walk stops at an entry that is not an address.
        assert_eq!(
            c(&[("x-forwarded-for", "6.6.6.6, unknown, 10.0.0.9"), ("x-real-ip", "198.51.100.7")]),
            ip("198.51.100.7")
        );
        assert_eq!(c(&[("x-forwarded-for", "6.6.6.6, unknown, 10.0.0.9")]), ip("10.0.0.2"));
        assert_eq!(c(&[("x-forwarded-for", "fe80::1%eth0")]), ip("10.0.0.2"));
        // ... but garbage left of the client is never reached.
        assert_eq!(c(&[("x-forwarded-for", "garbage, 198.51.100.7")]), ip("198.51.100.7"));
        // X-Real-IP must be one address in one header.
        assert_eq!(c(&[("x-real-ip", "198.51.100.7, 6.6.6.6")]), ip("10.0.0.2"));
        assert_eq!(c(&[("x-real-ip", "198.51.100.7"), ("x-real-ip", "6.6.6.6")]), ip("10.0.0.2"));
        assert_eq!(c(&[("x-real-ip", "nope")]), ip("10.0.0.2"));
    }
}
