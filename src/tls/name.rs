//! The subject common name of an X.509 certificate, read with a small DER
//! walk: the certificate has already been verified by rustls, so all this
//! needs is to find one attribute, not an X.509 parser.

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
/// `[0] EXPLICIT Version`, present in v2 and v3 certificates.
const VERSION: u8 = 0xa0;
const INTEGER: u8 = 0x02;
/// The content of the OID 2.5.4.3, `id-at-commonName`.
const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];

/// The subject common name (CN) of a DER certificate. `None` when the
/// certificate does not parse, its subject has no CN, or has more than one
/// (an ambiguous name must not become an identity).
pub fn cert_common_name(der: &[u8]) -> Option<String> {
    let (certificate, _) = element(der, SEQUENCE)?;
    let (mut tbs, _) = element(certificate, SEQUENCE)?;
    if tbs.first() == Some(&VERSION) {
        tbs = element(tbs, VERSION)?.1;
    }
    let (_serial, rest) = element(tbs, INTEGER)?;
    let (_signature, rest) = element(rest, SEQUENCE)?;
    let (_issuer, rest) = element(rest, SEQUENCE)?;
    let (_validity, rest) = element(rest, SEQUENCE)?;
    let (mut subject, _) = element(rest, SEQUENCE)?;
    let mut found = None;
    while !subject.is_empty() {
        let (mut rdn, rest) = element(subject, SET)?;
        subject = rest;
        while !rdn.is_empty() {
            let (attribute, rest) = element(rdn, SEQUENCE)?;
            rdn = rest;
            let (oid, value) = element(attribute, OID)?;
            if oid == COMMON_NAME {
                if found.is_some() {
                    return None;
                }
                found = Some(string(value)?);
            }
        }
    }
    found
}

/// The content of the element at the start of `input` if its tag is `tag`,
/// and what follows it.
fn element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&first, rest) = input.split_first()?;
    if first != tag {
        return None;
    }
    let (len, rest) = length(rest)?;
    if rest.len() < len {
        return None;
    }
    Some(rest.split_at(len))
}

/// Any element: its tag, content and what follows it.
fn any(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *input.first()?;
    let (content, rest) = element(input, tag)?;
    Some((tag, content, rest))
}

/// A DER length: short form, or long form of up to four bytes.
fn length(input: &[u8]) -> Option<(usize, &[u8])> {
    let (&first, rest) = input.split_first()?;
    if first < 0x80 {
        return Some((usize::from(first), rest));
    }
    let n = usize::from(first & 0x7f);
    if n == 0 || n > 4 || rest.len() < n {
        return None;
    }
    let (bytes, rest) = rest.split_at(n);
    let len = bytes
        .iter()
        .fold(0usize, |len, &b| (len << 8) | usize::from(b));
    Some((len, rest))
}

/// A directory string: UTF8String, PrintableString, IA5String,
/// TeletexString (read as UTF-8, as everyone does) or BMPString (UTF-16).
fn string(value: &[u8]) -> Option<String> {
    let (tag, content, rest) = any(value)?;
    if !rest.is_empty() {
        return None;
    }
    match tag {
        0x0c | 0x13 | 0x16 | 0x14 => String::from_utf8(content.to_vec()).ok(),
        0x1e if content.len() % 2 == 0 => {
            let units: Vec<u16> = content
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16(&units).ok()
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::cert_common_name;
    use rcgen::{CertificateParams, DnType, KeyPair};

    fn cert(names: &[(DnType, &str)]) -> Vec<u8> {
        let mut params = CertificateParams::new(vec!["client.test".to_owned()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (ty, value) in names {
            params.distinguished_name.push(ty.clone(), *value);
        }
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn the_subject_common_name_is_read() {
        let der = cert(&[
            (DnType::OrganizationName, "Prism"),
            (DnType::CommonName, "billing-service"),
            (DnType::CountryName, "NL"),
        ]);
        assert_eq!(cert_common_name(&der).as_deref(), Some("billing-service"));
    }

    #[test]
    fn a_subject_without_a_common_name_has_none() {
        let der = cert(&[(DnType::OrganizationName, "Prism")]);
        assert_eq!(cert_common_name(&der), None);
    }

    #[test]
    fn garbage_and_truncated_certificates_have_no_name() {
        let der = cert(&[(DnType::CommonName, "svc")]);
        assert_eq!(cert_common_name(&der[..der.len() / 2]), None);
        assert_eq!(cert_common_name(b"not a certificate"), None);
        assert_eq!(cert_common_name(&[]), None);
    }
}
