//! Hostile input: whatever a client sends as a token, `verify` answers with an error value, never a
//! panic, and a token changed in any single character never verifies.

use jsonwebtoken::Algorithm;
use proptest::prelude::*;

use super::{claims, hs_verifier, sign_hs, SECRET};

const BASE64URL: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

proptest! {
    #[test]
    fn arbitrary_strings_never_verify(token in "\\PC{0,400}") {
        let verifier = hs_verifier(|_| {});
        prop_assert!(verifier.verify(&token).is_err());
    }

    #[test]
    fn jwt_shaped_noise_never_verifies(
        parts in proptest::collection::vec("[A-Za-z0-9_-]{0,120}", 3),
    ) {
        let verifier = hs_verifier(|_| {});
        prop_assert!(verifier.verify(&parts.join(".")).is_err());
    }

    #[test]
    fn single_character_changes_never_verify(at in any::<prop::sample::Index>(), to in 0..BASE64URL.len()) {
        let token = sign_hs(Algorithm::HS256, SECRET, &claims("alice"));
        let mut bytes = token.clone().into_bytes();
        let i = at.index(bytes.len());
        prop_assume!(bytes[i] != b'.' && bytes[i] != BASE64URL[to]);
        bytes[i] = BASE64URL[to];
        let changed = String::from_utf8(bytes).expect("ASCII stays ASCII");
        let verifier = hs_verifier(|_| {});
        prop_assert!(verifier.verify(&changed).is_err(), "{} verified", changed);
    }
}
