//! The per-sandbox CA and the leaf certificates it signs.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

use crate::TlsError;

/// How long the CA (and so every leaf) is valid.
const VALIDITY: Duration = Duration::days(7);
/// Backdating against small clock differences between host and sandbox.
const BACKDATE: Duration = Duration::hours(1);
/// At most this many leaf certificates are kept; the oldest goes first.
pub(crate) const LEAF_CACHE: usize = 256;

/// A CA that exists for one sandbox only. Its certificate goes into the sandbox's trust store;
/// its private key never leaves this process (it is not even reachable through the API).
pub struct SandboxCa {
    label: String,
    cert_pem: String,
    not_after: OffsetDateTime,
    issuer: Issuer<'static, KeyPair>,
    leaves: Mutex<LeafCache>,
}

#[derive(Default)]
struct LeafCache {
    map: HashMap<String, Arc<CertifiedKey>>,
    order: VecDeque<String>,
}

impl std::fmt::Debug for SandboxCa {
    // Deliberately no key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxCa")
            .field("label", &self.label)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn ca_err(what: &str, e: impl std::fmt::Display) -> TlsError {
    TlsError::Ca(format!("{what}: {e}"))
}

impl SandboxCa {
    /// A fresh CA: ECDSA P-256, `CA:true` (path length 0), key usage certificate/CRL signing,
    /// valid for 7 days, subject CN "moat sandbox CA <label>".
    pub fn generate(label: &str) -> Result<SandboxCa, TlsError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| ca_err("generating the CA key", e))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("moat sandbox CA {label}"));
        dn.push(DnType::OrganizationName, "moat");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + VALIDITY;
        params.serial_number = Some(random_serial()?);
        let cert = params
            .self_signed(&key)
            .map_err(|e| ca_err("signing the CA certificate", e))?;
        Ok(SandboxCa {
            label: label.to_string(),
            cert_pem: cert.pem(),
            not_after: params.not_after,
            issuer: Issuer::new(params, key),
            leaves: Mutex::new(LeafCache::default()),
        })
    }

    /// The CA certificate, PEM. This is what the sandbox trusts; it holds no key.
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The leaf for `host` (a DNS name, or an IP literal -> IP SAN), from the cache or freshly
    /// signed. The cache holds at most [`LEAF_CACHE`] hosts.
    pub(crate) fn leaf(&self, host: &str) -> Result<Arc<CertifiedKey>, TlsError> {
        {
            let cache = self.leaves.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(k) = cache.map.get(host) {
                return Ok(k.clone());
            }
        }
        let leaf = Arc::new(self.sign_leaf(host)?);
        let mut cache = self.leaves.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = cache.map.get(host) {
            return Ok(k.clone()); // another connection won the race
        }
        while cache.map.len() >= LEAF_CACHE {
            match cache.order.pop_front() {
                Some(old) => {
                    cache.map.remove(&old);
                }
                None => break,
            }
        }
        cache.map.insert(host.to_string(), leaf.clone());
        cache.order.push_back(host.to_string());
        Ok(leaf)
    }

    #[cfg(test)]
    pub(crate) fn cached_leaves(&self) -> usize {
        self.leaves
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map
            .len()
    }

    #[cfg(test)]
    pub(crate) fn key_pem_for_test(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    fn sign_leaf(&self, host: &str) -> Result<CertifiedKey, TlsError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| ca_err("generating a leaf key", e))?;
        let mut params = CertificateParams::default();
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        params.subject_alt_names = vec![match bare.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                host.to_string()
                    .try_into()
                    .map_err(|e| ca_err(&format!("host {host:?} is not a DNS name"), e))?,
            ),
        }];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = self.not_after.min(now + VALIDITY);
        params.serial_number = Some(random_serial()?);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| ca_err(&format!("signing the leaf for {host}"), e))?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = rustls::crypto::ring::sign::any_ecdsa_type(&der)
            .map_err(|e| ca_err("loading the leaf key", e))?;
        let chain: Vec<CertificateDer<'static>> = vec![cert.der().clone()];
        Ok(CertifiedKey::new(chain, signing))
    }
}

fn random_serial() -> Result<rcgen::SerialNumber, TlsError> {
    use rustls::crypto::ring::default_provider;
    let mut bytes = [0u8; 16];
    default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|e| ca_err("random serial number", format!("{e:?}")))?;
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // and exactly 16 bytes long
    Ok(rcgen::SerialNumber::from_slice(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cert_pem_has_no_key() {
        let ca = SandboxCa::generate("t1").expect("ca");
        let pem = ca.cert_pem();
        let key = ca.key_pem_for_test();
        assert!(key.contains("PRIVATE KEY"));
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(!pem.contains("PRIVATE"));
        // not even the base64 body of the key
        let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(!pem.replace('\n', "").contains(&body));
        assert!(!format!("{ca:?}").contains(&body));
    }

    #[test]
    fn leaves_are_cached_and_bounded() {
        let ca = SandboxCa::generate("t2").expect("ca");
        let a = ca.leaf("a.test").expect("leaf");
        let b = ca.leaf("a.test").expect("leaf");
        assert!(Arc::ptr_eq(&a, &b));
        ca.leaf("127.0.0.1").expect("ip leaf");
        ca.leaf("::1").expect("ip6 leaf");
        for i in 0..LEAF_CACHE + 5 {
            ca.leaf(&format!("h{i}.test")).expect("leaf");
        }
        assert_eq!(ca.cached_leaves(), LEAF_CACHE);
        assert!(ca.leaf("b\u{e4}d.test").is_err());
    }
}
