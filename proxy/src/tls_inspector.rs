//! The `tls_inspector` listener filter: reads SNI and ALPN from a peeked TLS ClientHello
//! without consuming it, so filter chain selection can use them.

/// Result of looking at the first bytes of a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Parse {
    NotTls,
    NeedMore,
    Hello {
        sni: Option<String>,
        alpn: Vec<String>,
    },
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.buf.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(b[0]) << 8 | usize::from(b[1]))
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]))
    }
}

/// Parses a ClientHello carried in the first TLS record.
pub fn parse_client_hello(buf: &[u8]) -> Parse {
    if buf.is_empty() {
        return Parse::NeedMore;
    }
    if buf[0] != 0x16 {
        return Parse::NotTls;
    }
    if buf.len() < 5 {
        return Parse::NeedMore;
    }
    if buf[1] != 0x03 {
        return Parse::NotTls;
    }
    let record_len = usize::from(buf[3]) << 8 | usize::from(buf[4]);
    let Some(record) = buf.get(5..5 + record_len) else {
        return Parse::NeedMore;
    };
    parse_handshake(record).unwrap_or(Parse::Hello {
        sni: None,
        alpn: Vec::new(),
    })
}

fn parse_handshake(record: &[u8]) -> Option<Parse> {
    let mut r = Reader {
        buf: record,
        pos: 0,
    };
    if r.u8()? != 1 {
        return Some(Parse::NotTls);
    }
    let _len = r.u24()?;
    r.take(2 + 32)?;
    let sid = r.u8()?;
    r.take(sid)?;
    let suites = r.u16()?;
    r.take(suites)?;
    let comp = r.u8()?;
    r.take(comp)?;
    let mut sni = None;
    let mut alpn = Vec::new();
    let ext_total = r.u16()?;
    let exts = r.take(ext_total)?;
    let mut e = Reader { buf: exts, pos: 0 };
    while e.pos < exts.len() {
        let ty = e.u16()?;
        let len = e.u16()?;
        let data = e.take(len)?;
        let mut d = Reader { buf: data, pos: 0 };
        match ty {
            0 => {
                let _list = d.u16()?;
                if d.u8()? == 0 {
                    let n = d.u16()?;
                    sni = Some(String::from_utf8_lossy(d.take(n)?).to_ascii_lowercase());
                }
            }
            16 => {
                let list = d.u16()?;
                let end = 2 + list;
                while d.pos < end.min(data.len()) {
                    let n = d.u8()?;
                    alpn.push(String::from_utf8_lossy(d.take(n)?).into_owned());
                }
            }
            _ => {}
        }
    }
    Some(Parse::Hello { sni, alpn })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_is_not_tls() {
        assert_eq!(parse_client_hello(b"GET / HTTP/1.1\r\n"), Parse::NotTls);
        assert_eq!(parse_client_hello(b"PRI * HTTP/2.0\r\n"), Parse::NotTls);
    }

    #[test]
    fn truncated_record_needs_more() {
        assert_eq!(
            parse_client_hello(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]),
            Parse::NeedMore
        );
    }
}
