//! Encryption of the CML passwords stored with registered workers:
//! AES-256-GCM with a random 96-bit nonce per encryption, and the worker id
//! as associated data so that a ciphertext copied to another worker's
//! document does not decrypt.

use aes_gcm::aead::{Aead, KeyInit, OsRng, Payload};
use aes_gcm::{AeadCore, Aes256Gcm, Key, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use secrecy::{ExposeSecret, SecretString};

/// The configured key, and the one before it while a rotation is under
/// way. Every seal uses the key; a password opens under either. Its
/// `Debug` shows nothing of the keys.
#[derive(Clone)]
pub struct PasswordCipher {
    cipher: Aes256Gcm,
    previous: Option<Aes256Gcm>,
}

impl std::fmt::Debug for PasswordCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PasswordCipher([REDACTED])")
    }
}

/// A password as stored: nonce and ciphertext (with its tag).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

impl PasswordCipher {
    /// Reads `security.encryption_key`: `None` when empty.
    ///
    /// # Errors
    /// A reason (without the key) when it is not base64 of 32 bytes.
    pub fn from_setting(key: &SecretString) -> Result<Option<Self>, String> {
        Ok(aes(key)?.map(|cipher| Self {
            cipher,
            previous: None,
        }))
    }

    /// With `previous` (`security.previous_encryption_key`) opening what
    /// the current key does not; empty is none.
    ///
    /// # Errors
    /// As [`PasswordCipher::from_setting`], for the previous key.
    pub fn with_previous(mut self, previous: &SecretString) -> Result<Self, String> {
        self.previous = aes(previous)?;
        Ok(self)
    }

    /// Opens with the current key only: whether a password is sealed under
    /// it already (a rotation skips those).
    ///
    /// # Errors
    /// As [`PasswordCipher::open`].
    pub fn open_with_current_key(
        &self,
        sealed: &Sealed,
        context: &str,
    ) -> Result<SecretString, String> {
        open_with(&self.cipher, sealed, context)
    }

    /// # Errors
    /// Only if the cipher fails, which AES-GCM does not for short inputs.
    pub fn seal(&self, password: &SecretString, context: &str) -> Result<Sealed, String> {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let ciphertext = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: password.expose_secret().as_bytes(),
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| "encryption failed".to_owned())?;
        Ok(Sealed {
            nonce: nonce.to_vec(),
            ciphertext,
        })
    }

    /// # Errors
    /// When the key is not the one the password was sealed with, the data
    /// was altered, or `context` differs.
    pub fn open(&self, sealed: &Sealed, context: &str) -> Result<SecretString, String> {
        match (open_with(&self.cipher, sealed, context), &self.previous) {
            (Err(_), Some(previous)) => open_with(previous, sealed, context),
            (result, _) => result,
        }
    }
}

/// The AES key a setting holds: `None` when empty.
fn aes(key: &SecretString) -> Result<Option<Aes256Gcm>, String> {
    let text = key.expose_secret().trim();
    if text.is_empty() {
        return Ok(None);
    }
    let bytes = STANDARD
        .decode(text)
        .map_err(|_| "must be base64 (e.g. `openssl rand -base64 32`)".to_owned())?;
    if bytes.len() != 32 {
        return Err(format!(
            "must decode to 32 bytes for AES-256, not {}",
            bytes.len()
        ));
    }
    Ok(Some(Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&bytes))))
}

fn open_with(cipher: &Aes256Gcm, sealed: &Sealed, context: &str) -> Result<SecretString, String> {
    if sealed.nonce.len() != 12 {
        return Err("stored nonce has the wrong length".into());
    }
    let plain = cipher
        .decrypt(
            Nonce::from_slice(&sealed.nonce),
            Payload {
                msg: &sealed.ciphertext,
                aad: context.as_bytes(),
            },
        )
        .map_err(|_| {
            "cannot decrypt the stored password: wrong security.encryption_key, or altered data"
                .to_owned()
        })?;
    String::from_utf8(plain)
        .map(SecretString::from)
        .map_err(|_| "decrypted password is not UTF-8".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> SecretString {
        SecretString::from(STANDARD.encode([byte; 32]))
    }

    #[test]
    fn during_a_rotation_both_keys_open_and_only_the_new_one_seals() {
        let old = PasswordCipher::from_setting(&key(7)).unwrap().unwrap();
        let sealed_old = old.seal(&SecretString::from("pw"), "w").unwrap();
        let ring = PasswordCipher::from_setting(&key(8))
            .unwrap()
            .unwrap()
            .with_previous(&key(7))
            .unwrap();
        assert_eq!(ring.open(&sealed_old, "w").unwrap().expose_secret(), "pw");
        assert!(ring.open_with_current_key(&sealed_old, "w").is_err());
        let sealed_new = ring.seal(&SecretString::from("pw"), "w").unwrap();
        assert!(ring.open_with_current_key(&sealed_new, "w").is_ok());
        assert!(
            old.open(&sealed_new, "w").is_err(),
            "sealed under the new key"
        );
        assert!(
            ring.open(&sealed_old, "other").is_err(),
            "the context still binds"
        );
    }

    #[test]
    fn round_trips_and_binds_the_context() {
        let c = PasswordCipher::from_setting(&key(7)).unwrap().unwrap();
        let sealed = c.seal(&SecretString::from("s3cret-pw"), "cml-1").unwrap();
        assert!(!sealed.ciphertext.windows(9).any(|w| w == b"s3cret-pw"));
        assert_eq!(
            c.open(&sealed, "cml-1").unwrap().expose_secret(),
            "s3cret-pw"
        );
        assert!(
            c.open(&sealed, "cml-2").is_err(),
            "another worker's context"
        );
        let other = PasswordCipher::from_setting(&key(8)).unwrap().unwrap();
        assert!(other.open(&sealed, "cml-1").is_err(), "another key");
        let again = c.seal(&SecretString::from("s3cret-pw"), "cml-1").unwrap();
        assert_ne!(sealed.nonce, again.nonce, "fresh nonce per encryption");
    }

    #[test]
    fn empty_means_unset_and_bad_keys_are_refused_without_echoing_them() {
        assert!(
            PasswordCipher::from_setting(&SecretString::from(""))
                .unwrap()
                .is_none()
        );
        let err = PasswordCipher::from_setting(&SecretString::from("dG9vLXNob3J0")).unwrap_err();
        assert!(err.contains("32 bytes") && !err.contains("dG9v"), "{err}");
        let c = PasswordCipher::from_setting(&key(1)).unwrap().unwrap();
        assert_eq!(format!("{c:?}"), "PasswordCipher([REDACTED])");
    }
}
