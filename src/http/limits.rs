//! The trusted-proxy rule that says which address a connection counts against (the table
//! itself is `hub::peers`). Plain data structures, no sockets.

use std::io;
use std::net::IpAddr;

use http::HeaderMap;
use http::header::HeaderName;
use ipnet::IpNet;

use crate::Config;
pub(crate) use crate::hub::peers::{IpSlot, PerIp};

/// The peers trusted to name the client in the forwarded header, and that header.
#[derive(Debug, Clone)]
pub struct Proxies {
    nets: Vec<IpNet>,
    header: HeaderName,
}

impl Proxies {
    /// Parses `trusted_proxies` (addresses or CIDR blocks) and `forwarded_header`; a bad
    /// entry is an `InvalidInput` error naming the key.
    pub fn from_config(config: &Config) -> io::Result<Proxies> {
        let invalid = |message: String| io::Error::new(io::ErrorKind::InvalidInput, message);
        let mut nets = Vec::with_capacity(config.trusted_proxies.len());
        for entry in &config.trusted_proxies {
            let net = parse_net(entry).ok_or_else(|| {
                invalid(format!(
                    "invalid configuration: trusted_proxies: {entry:?} is not an IP \
                     address or CIDR block"
                ))
            })?;
            nets.push(net);
        }
        let header =
            HeaderName::from_bytes(config.forwarded_header.trim().as_bytes()).map_err(|_| {
                invalid(format!(
                    "invalid configuration: forwarded_header: {:?} is not a header name",
                    config.forwarded_header
                ))
            })?;
        Ok(Proxies { nets, header })
    }

    /// Whether `ip` is a trusted proxy.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.nets.iter().any(|net| net.contains(&ip))
    }

    /// The client a request from `peer` counts against: `peer` itself unless it is a
    /// trusted proxy; then the rightmost address of the forwarded header that is not itself
    /// a trusted proxy (proxies append the address they received from, so everything to
    /// the left of the first untrusted hop may be forged by the client). A missing or
    /// unparsable header falls back to `peer`.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.is_trusted(peer) {
            return peer;
        }
        // Repeated headers are one list, in order (RFC 9110 §5.3).
        let mut hops: Vec<&str> = Vec::new();
        for value in headers.get_all(&self.header) {
            let Ok(text) = value.to_str() else {
                return peer;
            };
            hops.extend(text.split(','));
        }
        let mut client = None;
        for hop in hops.iter().rev() {
            let Some(ip) = parse_hop(hop) else {
                // An unparsable hop ends what can be believed.
                break;
            };
            client = Some(ip);
            if !self.is_trusted(ip) {
                break;
            }
        }
        client.unwrap_or(peer)
    }
}

/// An address (`10.0.0.1`) or a CIDR block (`10.0.0.0/8`).
fn parse_net(entry: &str) -> Option<IpNet> {
    let entry = entry.trim();
    entry
        .parse::<IpNet>()
        .ok()
        .or_else(|| entry.parse::<IpAddr>().ok().map(IpNet::from))
}

/// One hop of an `X-Forwarded-For` list: an address, perhaps bracketed or with a port.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    hop.parse::<std::net::SocketAddr>()
        .ok()
        .map(|addr| addr.ip().to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn proxies(list: &[&str]) -> Proxies {
        let config =
            Config::default().trusted_proxies(list.iter().map(|s| s.to_string()).collect());
        Proxies::from_config(&config).unwrap()
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn slots_count_and_entries_go_at_zero() {
        let table = PerIp::new(2);
        let a = ip("192.0.2.1");
        let one = table.try_acquire(a).unwrap();
        let two = table.try_acquire(a).unwrap();
        assert!(table.try_acquire(a).is_none());
        assert!(table.try_acquire(ip("192.0.2.2")).is_some());
        assert_eq!(table.count(a), 2);
        drop(one);
        let three = table.try_acquire(a).unwrap();
        drop((two, three));
        assert_eq!(table.count(a), 0);
        assert_eq!(
            table.addresses(),
            0,
            "an address holding nothing has no entry"
        );
    }

    #[test]
    fn a_slot_is_one_pointer() {
        assert_eq!(std::mem::size_of::<IpSlot>(), std::mem::size_of::<usize>());
    }

    #[test]
    fn slots_released_on_other_threads_keep_the_count() {
        let table = PerIp::new(8);
        let a = ip("192.0.2.1");
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let table = table.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        let slot = table.try_acquire(a);
                        assert!(slot.is_some(), "8 threads never hold more than 8");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(table.addresses(), 0);
    }

    #[test]
    fn refusals_racing_releases_do_not_deadlock() {
        let table = PerIp::new(1);
        let a = ip("192.0.2.1");
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let table = table.clone();
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        drop(table.try_acquire(a));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(table.addresses(), 0);
    }

    #[test]
    fn mapped_v4_counts_as_v4() {
        let table = PerIp::new(1);
        let _slot = table.try_acquire(ip("::ffff:192.0.2.1")).unwrap();
        assert!(table.try_acquire(ip("192.0.2.1")).is_none());
    }

    #[test]
    fn zero_is_no_limit() {
        let table = PerIp::new(0);
        let slots: Vec<_> = (0..100)
            .map(|_| table.try_acquire(ip("192.0.2.1")))
            .collect();
        assert!(slots.iter().all(Option::is_some));
        assert_eq!(table.addresses(), 0);
    }

    #[test]
    fn bad_proxy_entries_name_the_key() {
        for bad in ["10.0.0.0/33", "proxy.local", "10.0.0.1/"] {
            let config = Config::default().trusted_proxies(vec![bad.to_string()]);
            let e = Proxies::from_config(&config).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
            assert!(e.to_string().contains("trusted_proxies"), "{e}");
        }
        let config = Config::default().forwarded_header("bad header".to_string());
        let e = Proxies::from_config(&config).unwrap_err();
        assert!(e.to_string().contains("forwarded_header"), "{e}");
    }

    #[test]
    fn client_is_the_rightmost_untrusted_hop() {
        let p = proxies(&["10.0.0.0/8", "192.0.2.7"]);
        let proxy = ip("10.1.2.3");
        // An untrusted peer is the client, whatever it claims.
        assert_eq!(
            p.client(ip("198.51.100.1"), &xff(&["203.0.113.9"])),
            ip("198.51.100.1")
        );
        assert_eq!(p.client(proxy, &xff(&["203.0.113.9"])), ip("203.0.113.9"));
        // A forged left part is ignored: the last untrusted hop is the client.
        assert_eq!(
            p.client(proxy, &xff(&["1.1.1.1, 203.0.113.9, 10.9.9.9"])),
            ip("203.0.113.9")
        );
        // Repeated headers are one list.
        assert_eq!(
            p.client(proxy, &xff(&["1.1.1.1", "203.0.113.9, 192.0.2.7"])),
            ip("203.0.113.9")
        );
        // Ports and brackets.
        assert_eq!(
            p.client(proxy, &xff(&["203.0.113.9:1234"])),
            ip("203.0.113.9")
        );
        assert_eq!(
            p.client(proxy, &xff(&["[2001:db8::1]:80"])),
            ip("2001:db8::1")
        );
        // Missing or garbage falls back to the peer.
        assert_eq!(p.client(proxy, &HeaderMap::new()), proxy);
        assert_eq!(p.client(proxy, &xff(&["unknown"])), proxy);
        // Only trusted hops: the leftmost of them is as far as can be seen.
        assert_eq!(
            p.client(proxy, &xff(&["10.0.0.1, 10.0.0.2"])),
            ip("10.0.0.1")
        );
        // Garbage to the left of a good hop stops the walk at the good hop.
        assert_eq!(
            p.client(proxy, &xff(&["garbage, 10.0.0.5"])),
            ip("10.0.0.5")
        );
    }
}
