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
    /// The key, PEM, for [`SandboxCa::export`] only (the daemon keeps it across restarts).
    key_pem: String,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    serial: Vec<u8>,
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
        let serial = random_serial()?;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let cert = params
            .self_signed(&key)
            .map_err(|e| ca_err("signing the CA certificate", e))?;
        Ok(SandboxCa {
            label: label.to_string(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            not_before: params.not_before,
            not_after: params.not_after,
            serial,
            issuer: Issuer::new(params, key),
            leaves: Mutex::new(LeafCache::default()),
        })
    }

    /// Everything needed to bring this CA back in another process ([`SandboxCa::restore`]):
    /// the daemon stores it (root-only) so that a sandbox keeps its CA across a restart.
    /// Holds the private key: never show it, never put it where a sandbox can read.
    pub fn export(&self) -> CaState {
        CaState {
            label: self.label.clone(),
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
            not_before: self.not_before.unix_timestamp(),
            not_after: self.not_after.unix_timestamp(),
            serial: self.serial.clone(),
        }
    }

    /// The CA [`SandboxCa::export`] saved: the same certificate (which the sandbox trusts),
    /// key, name and validity, so the leaves it signs chain to the trusted certificate.
    pub fn restore(st: &CaState) -> Result<SandboxCa, TlsError> {
        let key = KeyPair::from_pem(&st.key_pem).map_err(|e| ca_err("the saved CA key", e))?;
        let at = |t: i64| {
            OffsetDateTime::from_unix_timestamp(t).map_err(|e| ca_err("the saved CA validity", e))
        };
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("moat sandbox CA {}", st.label));
        dn.push(DnType::OrganizationName, "moat");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = at(st.not_before)?;
        params.not_after = at(st.not_after)?;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&st.serial));
        Ok(SandboxCa {
            label: st.label.clone(),
            cert_pem: st.cert_pem.clone(),
            key_pem: st.key_pem.clone(),
            not_before: params.not_before,
            not_after: params.not_after,
            serial: st.serial.clone(),
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
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&random_serial()?));
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

/// A saved [`SandboxCa`] (see [`SandboxCa::export`]). Its `Debug` shows no key.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaState {
    pub label: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub not_before: i64,
    pub not_after: i64,
    pub serial: Vec<u8>,
}

impl std::fmt::Debug for CaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaState")
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

fn random_serial() -> Result<Vec<u8>, TlsError> {
    use rustls::crypto::ring::default_provider;
    let mut bytes = [0u8; 16];
    default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|e| ca_err("random serial number", format!("{e:?}")))?;
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // and exactly 16 bytes long
    Ok(bytes.to_vec())
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
    fn an_exported_ca_comes_back_and_its_leaves_chain_to_the_original_certificate() {
        use rustls::client::danger::ServerCertVerifier;
        let ca = SandboxCa::generate("t2").expect("ca");
        let st = ca.export();
        assert!(!format!("{st:?}").contains("PRIVATE"));
        let json = serde_json::to_string(&st).expect("json");
        let back =
            SandboxCa::restore(&serde_json::from_str(&json).expect("parse")).expect("restore");
        assert_eq!(back.cert_pem(), ca.cert_pem());
        let mut roots = rustls::RootCertStore::empty();
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(ca.cert_pem().as_bytes())
            .expect("pem");
        roots.add(der).expect("root");
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .expect("verifier");
        let leaf = back.leaf("api.example.test").expect("leaf");
        let name = rustls_pki_types::ServerName::try_from("api.example.test").expect("name");
        verifier
            .verify_server_cert(
                &leaf.cert[0],
                &[],
                &name,
                &[],
                rustls_pki_types::UnixTime::now(),
            )
            .expect("a restored CA's leaf chains to the certificate the sandbox trusts");
        let other = SandboxCa::generate("t2").expect("ca");
        let leaf = other.leaf("api.example.test").expect("leaf");
        assert!(verifier
            .verify_server_cert(
                &leaf.cert[0],
                &[],
                &name,
                &[],
                rustls_pki_types::UnixTime::now()
            )
            .is_err());
        let mut bad = st.clone();
        bad.key_pem = "nope".into();
        assert!(SandboxCa::restore(&bad).is_err());
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
