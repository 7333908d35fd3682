# 002_jwt_independent.pl: JWTs, JWKS and sealed boxes checked against an
# independent implementation, PyJWT 2.6 + python3-cryptography, run as
# /usr/bin/python3. Python gets only what a relying party would get (the
# jwks() JSON and the tokens) to verify our RS256, ES256 and EdDSA tokens;
# it then attacks: tokens signed with keys we do not know, the HS256 forgery
# keyed with our RSA public key PEM, and (after unsealing our private keys
# with the master key file, which also checks the sealing format) validly
# signed tokens with duplicate claims, hostile payloads and headers. Every
# attack must fail with 28000 "invalid token". Sealed boxes are opened and
# made by Python too.
use strict;
use warnings;

use Encode qw(decode);
use FindBin;
use lib "$FindBin::RealBin/lib";
use EventshopTest;
use IPC::Run;
use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $python = '/usr/bin/python3';

# Keys, made with openssl as an operator would.
my $keydir = PostgreSQL::Test::Utils::tempdir();
my $key_conf = key_settings($keydir);
my ($seal_public) = $key_conf =~ /seal_public_key = '([^']+)'/;
like($seal_public, qr/^[A-Za-z0-9_-]{43}$/, 'X25519 public key in base64url');

my $node = worker_free_node('jwt', '', $key_conf);

# Keys of all three algorithms; one rotation more for RS256 so that the
# JWKS also holds a retired key.
my %kid;
for my $alg (qw(RS256 ES256 EdDSA))
{
	$kid{$alg} = $node->safe_psql('postgres', "SELECT eventshop.rotate_signing_keys('$alg')");
	like($kid{$alg}, qr/^[A-Za-z0-9_-]{43}$/, "$alg key created and activated");
}
my $now = time;
my $claims_sql = "jsonb_build_object('iss', 'eventshop', 'aud', 'eventshop', 'sub', 'user-1', "
  . "'iat', $now, 'nbf', $now, 'exp', $now + 600, 'jti', 'j1', 'sid', 's1', 'typ', 'access', "
  . "'roles', jsonb_build_array('customer'), 'name', 'Zoë \"Z\" \\ O''Brien')";
my %tokens;
for my $alg (qw(RS256 ES256 EdDSA))
{
	$tokens{$alg} = $node->safe_psql('postgres', "SELECT eventshop._jwt_sign($claims_sql, '$alg')");
}
$tokens{retired} = $tokens{RS256};
my $retired_rs = $kid{RS256};
$kid{RS256} = $node->safe_psql('postgres', "SELECT eventshop.rotate_signing_keys('RS256')");
isnt($kid{RS256}, $retired_rs, 'RS256 rotated once more: the first RS256 token is now by a retired key');
$tokens{RS256} = $node->safe_psql('postgres', "SELECT eventshop._jwt_sign($claims_sql, 'RS256')");

my $jwks = decode_json($node->safe_psql('postgres', 'SELECT eventshop.jwks()'));
is(scalar @{ $jwks->{keys} }, 7, 'JWKS: 3 active, 3 standby, 1 retired key');

my %sealed_rows = map { split /\|/ } split /\n/, $node->safe_psql('postgres',
	"SELECT kid, encode(private_key_sealed, 'hex') FROM eventshop.signing_keys WHERE state = 'active'");
my @boxes = map { $node->safe_psql('postgres', "SELECT eventshop._seal('secret $_ ✓')") } 1 .. 3;

my $master = PostgreSQL::Test::Utils::slurp_file("$keydir/master.key");
chomp $master;
my $seal_private = PostgreSQL::Test::Utils::slurp_file("$keydir/seal_private.key");

my $request = encode_json(
	{
		jwks => $jwks,
		tokens => \%tokens,
		kid => \%kid,
		master_key => $master,
		sealed => \%sealed_rows,
		boxes => \@boxes,
		seal_private => $seal_private,
		seal_public => $seal_public,
		now => $now,
	});

my $script = <<'PY';
import base64, hashlib, hmac, json, sys
import jwt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

def b64u(b):
    return base64.urlsafe_b64encode(b).rstrip(b'=').decode()

def b64u_dec(s):
    return base64.urlsafe_b64decode(s + '=' * (-len(s) % 4))

def compact(obj):
    return json.dumps(obj, separators=(',', ':'), ensure_ascii=False)

req = json.load(sys.stdin)
out = {'versions': [jwt.__version__]}
kid = req['kid']
keyset = {k['kid']: k for k in req['jwks']['keys']}
jwt.PyJWKSet.from_dict(req['jwks'])  # the whole set parses

# 1. our tokens verify with PyJWT and nothing but the JWKS
out['verified'] = {}
for name, tok in req['tokens'].items():
    header = jwt.get_unverified_header(tok)
    jwk = keyset[header['kid']]
    out['verified'][name] = jwt.decode(tok, key=jwt.PyJWK(jwk).key, algorithms=[jwk['alg']],
                                       audience='eventshop', issuer='eventshop')
# PyJWT's own checks reject a token under the wrong key or algorithm
try:
    jwt.decode(req['tokens']['RS256'], key=jwt.PyJWK(keyset[kid['ES256']]).key, algorithms=['ES256'],
               audience='eventshop')
    out['cross_check'] = 'accepted'
except jwt.InvalidTokenError as e:
    out['cross_check'] = 'rejected'

claims = {'iss': 'eventshop', 'aud': 'eventshop', 'sub': 'admin', 'iat': req['now'], 'exp': req['now'] + 600,
          'typ': 'access', 'roles': ['admin']}
attacks = {}

# 2. tokens signed by keys we do not know, under our kids
attacks['foreign RS256 key'] = jwt.encode(claims, rsa.generate_private_key(65537, 2048), algorithm='RS256',
                                          headers={'kid': kid['RS256']})
attacks['foreign ES256 key'] = jwt.encode(claims, ec.generate_private_key(ec.SECP256R1()), algorithm='ES256',
                                          headers={'kid': kid['ES256']})
attacks['foreign EdDSA key'] = jwt.encode(claims, ed25519.Ed25519PrivateKey.generate(), algorithm='EdDSA',
                                          headers={'kid': kid['EdDSA']})

# 3. HS256 keyed with our RSA public key as PEM (PyJWT refuses to do this, so by hand)
rj = keyset[kid['RS256']]
pem = rsa.RSAPublicNumbers(int.from_bytes(b64u_dec(rj['e']), 'big'),
                           int.from_bytes(b64u_dec(rj['n']), 'big')).public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
out['pem_head'] = pem.decode().splitlines()[0]
for name, header in [('HS256 keyed with our public key PEM', {'alg': 'HS256', 'typ': 'JWT', 'kid': kid['RS256']}),
                     ('HS256 keyed with our PEM, no kid', {'alg': 'HS256', 'typ': 'JWT'}),
                     ('HS256 keyed with our PEM, alg hs256', {'alg': 'hs256', 'typ': 'JWT', 'kid': kid['RS256']})]:
    si = b64u(compact(header).encode()) + '.' + b64u(compact(claims).encode())
    attacks[name] = si + '.' + b64u(hmac.new(pem, si.encode(), hashlib.sha256).digest())

# 4. our private keys, unsealed with the master key file: HKDF-SHA256 ("eventshop kek v1")
#    then AES-256-GCM with the kid as additional data
kek = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b'eventshop kek v1').derive(
    bytes.fromhex(req['master_key']))
ours = {}
for k, sealed_hex in req['sealed'].items():
    blob = bytes.fromhex(sealed_hex)
    assert blob[0] == 1
    der = AESGCM(kek).decrypt(blob[1:13], blob[13:], k.encode())
    ours[keyset[k]['alg']] = (k, serialization.load_der_private_key(der, None))
out['unsealed'] = sorted(ours)

def sign(alg, header_bytes, payload_bytes, der_ecdsa=False):
    k, key = ours[alg]
    si = (b64u(header_bytes) + '.' + b64u(payload_bytes)).encode()
    if alg == 'RS256':
        sig = key.sign(si, padding.PKCS1v15(), hashes.SHA256())
    elif alg == 'ES256':
        sig = key.sign(si, ec.ECDSA(hashes.SHA256()))
        if not der_ecdsa:
            r, s = decode_dss_signature(sig)
            sig = r.to_bytes(32, 'big') + s.to_bytes(32, 'big')
    else:
        sig = key.sign(si)
    return si.decode() + '.' + b64u(sig)

def hdr(alg, extra=''):
    return ('{"alg":"%s","typ":"JWT","kid":"%s"%s}' % (alg, ours[alg][0], extra)).encode()

good = compact(claims).encode()
out['good'] = {alg: sign(alg, hdr(alg), good) for alg in ('RS256', 'ES256', 'EdDSA')}
signed_attacks = {
    'duplicate claim (sub twice)': ('RS256', hdr('RS256'), b'{"sub":"user-1","sub":"admin","exp":9999999999}'),
    'duplicate claim (roles twice)': ('EdDSA', hdr('EdDSA'), b'{"roles":["customer"],"roles":["admin"]}'),
    'duplicate key in a nested object': ('ES256', hdr('ES256'), b'{"a":{"x":1,"x":2}}'),
    'payload is an array': ('RS256', hdr('RS256'), b'[{"sub":"admin"}]'),
    'payload is a string': ('RS256', hdr('RS256'), b'"admin"'),
    'payload is not JSON': ('EdDSA', hdr('EdDSA'), b'sub=admin'),
    'payload is not UTF-8': ('EdDSA', hdr('EdDSA'), b'{"sub":"\xff\xfe"}'),
    'payload number out of range': ('EdDSA', hdr('EdDSA'), b'{"exp":1e999999}'),
    'payload with \\u0000': ('EdDSA', hdr('EdDSA'), b'{"sub":"ad\\u0000min"}'),
    'payload nested 40 levels': ('EdDSA', hdr('EdDSA'), b'{"a":' + b'[' * 40 + b']' * 40 + b'}'),
    'payload with trailing garbage': ('EdDSA', hdr('EdDSA'), good + b'x'),
    'duplicate alg in a signed header': ('RS256', ('{"alg":"RS256","alg":"RS256","kid":"%s"}' % ours['RS256'][0]).encode(), good),
    'embedded jwk in a signed header': ('RS256', hdr('RS256', ',"jwk":{"kty":"oct","k":"AA"}'), good),
    'crit in a signed header': ('EdDSA', hdr('EdDSA', ',"crit":["exp"]'), good),
}
for name, (alg, h, p) in signed_attacks.items():
    attacks[name] = sign(alg, h, p)
attacks['ECDSA signature in DER form'] = sign('ES256', hdr('ES256'), good, der_ecdsa=True)
# a valid EdDSA signature under a header that claims RS256 for the EdDSA kid
ek = ours['EdDSA']
si = (b64u(('{"alg":"RS256","typ":"JWT","kid":"%s"}' % ek[0]).encode()) + '.' + b64u(good)).encode()
attacks['RS256 header on the EdDSA kid, EdDSA signature'] = si.decode() + '.' + b64u(ek[1].sign(si))
out['attacks'] = attacks

# 5. sealed boxes: open ours, make one for the database
priv = x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(req['seal_private']))
own_pub = b64u_dec(req['seal_public'])
assert priv.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) == own_pub

def box_keys(shared, eph_pub):
    okm = HKDF(algorithm=hashes.SHA256(), length=44, salt=eph_pub + own_pub, info=b'eventshop seal v1').derive(shared)
    return okm[:32], okm[32:]

opened = []
for s in req['boxes']:
    box = b64u_dec(s)
    assert box[0] == 1
    key, nonce = box_keys(priv.exchange(x25519.X25519PublicKey.from_public_bytes(box[1:33])), box[1:33])
    opened.append(AESGCM(key).decrypt(nonce, box[33:], box[:33]).decode())
out['opened'] = opened
eph = x25519.X25519PrivateKey.generate()
eph_pub = eph.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
key, nonce = box_keys(eph.exchange(x25519.X25519PublicKey.from_public_bytes(own_pub)), eph_pub)
head = b'\x01' + eph_pub
out['python_box'] = b64u(head + AESGCM(key).encrypt(nonce, 'sealed by python ✓'.encode(), head))
print(json.dumps(out))
PY

my ($stdout, $stderr) = ('', '');
my $ok = IPC::Run::run([ $python, '-c', $script ], '<', \$request, '>', \$stdout, '2>', \$stderr);
ok($ok, 'the independent implementation ran') or diag($stderr);
my $res = decode_json($stdout);
like($res->{versions}[0], qr/^2\./, "PyJWT $res->{versions}[0]");

# 1. PyJWT verifies every token we signed, using only the JWKS
for my $name (qw(RS256 ES256 EdDSA retired))
{
	my $c = $res->{verified}{$name};
	is($c->{sub}, 'user-1', "PyJWT verifies our $name token");
	is_deeply([ $c->{roles}, $c->{name}, $c->{exp} - $c->{iat} ],
		[ ['customer'], "Zo\x{eb} \"Z\" \\ O'Brien", 600 ], "and reads its claims ($name)");
}
is($res->{cross_check}, 'rejected', 'PyJWT itself rejects our RS256 token under the ES256 key');
is($res->{pem_head}, '-----BEGIN PUBLIC KEY-----', 'the forger built our RSA public key PEM from the JWKS');
is_deeply($res->{unsealed}, [qw(ES256 EdDSA RS256)],
	'the sealed private keys open with HKDF(master, "eventshop kek v1") + AES-256-GCM, kid as AAD');

# Our tokens re-signed by Python with our own (unsealed) keys verify: same format both ways.
for my $alg (qw(RS256 ES256 EdDSA))
{
	is($node->safe_psql('postgres',
			"SELECT eventshop._jwt_verify('$res->{good}{$alg}')->>'sub'"),
		'admin', "a token Python signs with our $alg key verifies");
}

# 2.-4. every attack fails cleanly with 28000 "invalid token"
my %expected_detail = (
	'foreign RS256 key' => 'The signature is not valid.',
	'foreign ES256 key' => 'The signature is not valid.',
	'foreign EdDSA key' => 'The signature is not valid.',
	'HS256 keyed with our public key PEM' => 'The algorithm is not one of RS256, ES256 and EdDSA.',
	'HS256 keyed with our PEM, no kid' => 'The algorithm is not one of RS256, ES256 and EdDSA.',
	'HS256 keyed with our PEM, alg hs256' => 'The algorithm is not one of RS256, ES256 and EdDSA.',
	'duplicate claim (sub twice)' => 'The payload has a duplicate key.',
	'duplicate claim (roles twice)' => 'The payload has a duplicate key.',
	'duplicate key in a nested object' => 'The payload has a duplicate key.',
	'payload is an array' => 'The payload is not a JSON object.',
	'payload is a string' => 'The payload is not a JSON object.',
	'payload is not JSON' => 'The payload is not valid JSON.',
	'payload is not UTF-8' => 'The payload is not valid UTF-8.',
	'payload number out of range' => 'The payload has a number out of range.',
	'payload with \\u0000' => 'The payload is not valid JSON.',
	'payload nested 40 levels' => 'The payload nests deeper than 32 levels.',
	'payload with trailing garbage' => 'The payload is not valid JSON.',
	'duplicate alg in a signed header' => 'The header has a duplicate key.',
	'embedded jwk in a signed header' => 'The header may hold only the string members alg, kid and typ.',
	'crit in a signed header' => 'The header may hold only the string members alg, kid and typ.',
	'ECDSA signature in DER form' => 'An ES256 signature is 64 bytes (r||s), not DER.',
	'RS256 header on the EdDSA kid, EdDSA signature' => 'The algorithm does not match the signing key\'s.',
);
is_deeply([ sort keys %{ $res->{attacks} } ], [ sort keys %expected_detail ], 'Python made every attack');
for my $name (sort keys %{ $res->{attacks} })
{
	my ($stdout2, $stderr2) = ('', '');
	my $rc = $node->psql('postgres',
		"\\set VERBOSITY verbose\nSELECT eventshop._jwt_verify('$res->{attacks}{$name}')",
		stdout => \$stdout2, stderr => \$stderr2);
	ok($rc != 0 && $stderr2 =~ /ERROR:  28000: invalid token\nDETAIL:  \Q$expected_detail{$name}\E/,
		"refused with 28000: $name") or diag($stderr2);
}
is($node->safe_psql('postgres', 'SELECT 1'), '1', 'the server is still up');
ok(-f $node->logfile && PostgreSQL::Test::Utils::slurp_file($node->logfile) !~ /terminated by signal|server process .* was terminated/,
	'no backend crashed');

# 5. sealed boxes, both ways
is_deeply($res->{opened}, [ map { "secret $_ \x{2713}" } 1 .. 3 ], 'Python opens the boxes _seal made');
is(decode('UTF-8', $node->safe_psql('postgres', "SELECT eventshop._open_sealed('$res->{python_box}')")),
	"sealed by python \x{2713}", '_open_sealed opens a box Python made');

# Nothing secret reached the server log (statements are logged by the test setup itself).
my $log = PostgreSQL::Test::Utils::slurp_file($node->logfile);
unlike($log, qr/\Q$master\E/, 'the master key is not in the server log');
my @errors = grep { /(ERROR|DETAIL|HINT):/ } split /\n/, $log;
ok(@errors >= 20 && !grep({ /\Q$keydir\E|\Q$seal_private\E/ } @errors),
	'no error message names a key file path or holds key material');

$node->stop;
done_testing();
