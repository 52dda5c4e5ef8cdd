#!/usr/bin/env python3
"""Interop helper: sign, verify, encrypt and decrypt JOSE tokens with Python libraries.

keywarden's integration tests call this script to prove that its JWS, JWE and JWKS match what
independent implementations produce and accept: PyJWT and jwcrypto for JWS, jwcrypto for JWE
(dir + A256GCM). It needs PyJWT, jwcrypto and cryptography; nothing else.

Subcommands (tokens and claims go to stdout; errors to stderr with exit status 1):

  verify-jws  --token T (--jwks FILE | --secret-b64 S) [--lib pyjwt|jwcrypto] [--iss I] [--aud A]
              Verifies a JWS, picking the key by the header's kid from a JWKS file (the
              algorithm is pinned to the JWK's "alg"), or with an HS256 secret. Prints the claims.
  sign-jws    --alg A (--pem-file F | --secret-b64 S) --kid K --claims JSON [--lib pyjwt|jwcrypto]
              Signs the claims with a PKCS#8 PEM private key or an HS256 secret. Prints the token.
  jwe-encrypt --key-b64 K --kid KID --claims JSON
              Encrypts the claims as compact JWE, alg dir, enc A256GCM. Prints the token.
  jwe-decrypt --key-b64 K --token T
              Decrypts a compact JWE (dir + A256GCM only). Prints the claims.

Secrets are base64 (standard or URL-safe, padding optional). Claims are printed as JSON with
sorted keys, so callers can compare them textually.
"""

import argparse
import base64
import json
import sys
import time

import jwt
from jwcrypto import jwe as jw_jwe
from jwcrypto import jwk as jw_jwk
from jwcrypto import jws as jw_jws

SIGNING_ALGS = ["HS256", "RS256", "ES256", "EdDSA"]


def b64_secret(text):
    """Decodes standard or URL-safe base64, with or without padding."""
    text = text.strip().replace("+", "-").replace("/", "_").rstrip("=")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def print_claims(claims):
    print(json.dumps(claims, sort_keys=True, separators=(",", ":")))


def load_jwks(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def find_jwk(jwks, kid):
    for key in jwks.get("keys", []):
        if key.get("kid") == kid:
            return key
    raise ValueError(f"no key with kid {kid!r} in the JWKS")


def check_registered_claims(claims, iss, aud):
    """jwcrypto's JWS layer checks signatures only; apply the same rules PyJWT applies."""
    now = time.time()
    if "exp" not in claims:
        raise ValueError("missing exp")
    if claims["exp"] <= now:
        raise ValueError("expired")
    if "nbf" in claims and claims["nbf"] > now:
        raise ValueError("not yet valid")
    if iss is not None and claims.get("iss") != iss:
        raise ValueError("wrong issuer")
    if aud is not None:
        token_aud = claims.get("aud")
        auds = token_aud if isinstance(token_aud, list) else [token_aud]
        if aud not in auds:
            raise ValueError("wrong audience")


def verify_jws(args):
    header = jwt.get_unverified_header(args.token)
    kid = header.get("kid")
    if args.jwks:
        jwk_dict = find_jwk(load_jwks(args.jwks), kid)
        alg = jwk_dict["alg"]
    else:
        jwk_dict = {"kty": "oct", "k": b64url(b64_secret(args.secret_b64)), "alg": "HS256"}
        alg = "HS256"
    if alg not in SIGNING_ALGS:
        raise ValueError(f"unsupported alg {alg!r}")

    if args.lib == "pyjwt":
        if args.jwks:
            key = jwt.PyJWKSet.from_dict({"keys": [jwk_dict]})[kid].key
        else:
            key = b64_secret(args.secret_b64)
        claims = jwt.decode(
            args.token,
            key,
            algorithms=[alg],
            issuer=args.iss,
            audience=args.aud,
            options={"require": ["exp"]},
        )
    else:
        key = jw_jwk.JWK(**jwk_dict)
        token = jw_jws.JWS()
        token.deserialize(args.token)
        # Pin the algorithm to the key: never let the header choose it.
        token.allowed_algs = [alg]
        token.verify(key, alg=alg)
        claims = json.loads(token.payload)
        check_registered_claims(claims, args.iss, args.aud)
    print_claims(claims)


def sign_jws(args):
    claims = json.loads(args.claims)
    if args.alg not in SIGNING_ALGS:
        raise ValueError(f"unsupported alg {args.alg!r}")
    if args.alg == "HS256":
        if not args.secret_b64:
            raise ValueError("HS256 needs --secret-b64")
        secret = b64_secret(args.secret_b64)
        pem = None
    else:
        if not args.pem_file:
            raise ValueError(f"{args.alg} needs --pem-file")
        with open(args.pem_file, "rb") as f:
            pem = f.read()
        secret = None

    if args.lib == "pyjwt":
        key = secret if secret is not None else pem
        token = jwt.encode(claims, key, algorithm=args.alg, headers={"kid": args.kid})
    else:
        if secret is not None:
            key = jw_jwk.JWK(kty="oct", k=b64url(secret))
        else:
            key = jw_jwk.JWK.from_pem(pem)
        signer = jw_jws.JWS(json.dumps(claims).encode("utf-8"))
        signer.allowed_algs = [args.alg]
        protected = {"alg": args.alg, "kid": args.kid, "typ": "JWT"}
        signer.add_signature(key, alg=args.alg, protected=json.dumps(protected))
        token = signer.serialize(compact=True)
    print(token)


def jwe_key(key_b64):
    raw = b64_secret(key_b64)
    if len(raw) != 32:
        raise ValueError("the token-encryption key must be 32 bytes")
    return jw_jwk.JWK(kty="oct", k=b64url(raw))


def jwe_encrypt(args):
    claims = json.loads(args.claims)
    protected = {"alg": "dir", "enc": "A256GCM", "kid": args.kid, "typ": "JWT"}
    token = jw_jwe.JWE(json.dumps(claims).encode("utf-8"), protected=json.dumps(protected))
    token.allowed_algs = ["dir", "A256GCM"]
    token.add_recipient(jwe_key(args.key_b64))
    print(token.serialize(compact=True))


def jwe_decrypt(args):
    token = jw_jwe.JWE()
    token.allowed_algs = ["dir", "A256GCM"]
    token.deserialize(args.token)
    header = json.loads(token.objects["protected"])
    if header.get("alg") != "dir" or header.get("enc") != "A256GCM":
        raise ValueError("not a dir + A256GCM JWE")
    token.decrypt(jwe_key(args.key_b64))
    print_claims(json.loads(token.payload))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("verify-jws", help="verify a JWS and print its claims")
    p.add_argument("--token", required=True)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--jwks", metavar="FILE")
    source.add_argument("--secret-b64")
    p.add_argument("--lib", choices=["pyjwt", "jwcrypto"], default="pyjwt")
    p.add_argument("--iss")
    p.add_argument("--aud")
    p.set_defaults(func=verify_jws)

    p = sub.add_parser("sign-jws", help="sign claims and print the JWS")
    p.add_argument("--alg", required=True, choices=SIGNING_ALGS)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--pem-file", metavar="FILE")
    source.add_argument("--secret-b64")
    p.add_argument("--kid", required=True)
    p.add_argument("--claims", required=True, help="a JSON object")
    p.add_argument("--lib", choices=["pyjwt", "jwcrypto"], default="pyjwt")
    p.set_defaults(func=sign_jws)

    p = sub.add_parser("jwe-encrypt", help="encrypt claims as dir + A256GCM JWE")
    p.add_argument("--key-b64", required=True)
    p.add_argument("--kid", required=True)
    p.add_argument("--claims", required=True, help="a JSON object")
    p.set_defaults(func=jwe_encrypt)

    p = sub.add_parser("jwe-decrypt", help="decrypt a dir + A256GCM JWE and print its claims")
    p.add_argument("--key-b64", required=True)
    p.add_argument("--token", required=True)
    p.set_defaults(func=jwe_decrypt)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except Exception as exc:  # noqa: BLE001 - any failure is a verification failure for callers
        print(f"{args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
