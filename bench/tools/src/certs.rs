//! A CA made for one run, and a certificate for api.openai.com signed by it. The cert also names
//! 127.0.0.1, so that a client going straight to the upstream ("direct") can verify it too.

use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};

pub fn run(argv: &[String]) -> Result<(), String> {
    let [dir] = argv else {
        return Err("certs takes one argument: the directory to write into".into());
    };
    let dir = Path::new(dir);
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;

    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "openai-proxy bench CA");
    let ca_key = KeyPair::generate().map_err(|e| e.to_string())?;
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).map_err(|e| e.to_string())?;

    let mut leaf = CertificateParams::new(vec!["api.openai.com".to_owned()])
        .map_err(|e| e.to_string())?;
    leaf.subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().expect("an IP address")));
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, "api.openai.com");
    let leaf_key = KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = leaf.signed_by(&leaf_key, &ca).map_err(|e| e.to_string())?;

    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))
    };
    write("ca.pem", ca.pem())?;
    write("cert.pem", cert.pem())?;
    write("key.pem", leaf_key.serialize_pem())?;
    Ok(())
}
