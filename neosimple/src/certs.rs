//! A throw-away certificate authority for test clusters: one CA and one certificate per node,
//! written as PEM files usable as NEO's `ca`, `cert` and `key` options.

use neo_lib::config::TlsFiles;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

pub struct TestCa {
    dir: PathBuf,
    name: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    /// Create a CA named `name`; its certificate is written to `dir/<name>.crt`.
    pub fn new(dir: &Path, name: &str) -> Result<TestCa, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        std::fs::write(dir.join(format!("{name}.crt")), issuer.pem())
            .map_err(|_| rcgen::Error::CouldNotParseCertificate)?;
        Ok(TestCa { dir: dir.to_path_buf(), name: name.to_string(), issuer })
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.join(format!("{}.crt", self.name))
    }

    /// Issue a certificate for node `node` (valid for 127.0.0.1 and localhost).
    pub fn issue(&self, node: &str) -> Result<TlsFiles, rcgen::Error> {
        let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
        params.distinguished_name.push(DnType::CommonName, node);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let cert_path = self.dir.join(format!("{node}.crt"));
        let key_path = self.dir.join(format!("{node}.key"));
        let io = |_| rcgen::Error::CouldNotParseCertificate;
        std::fs::write(&cert_path, cert.pem()).map_err(io)?;
        std::fs::write(&key_path, key.serialize_pem()).map_err(io)?;
        Ok(TlsFiles { ca: self.ca_path(), cert: cert_path, key: key_path })
    }
}
