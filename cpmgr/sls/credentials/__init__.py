"""Where request signing gets its keys (docs/configuration.md, "Credentials").

One small provider per source (`static`, `file`, `oidc`, `ecs_ram_role`, `uri`) behind the
`Provider` interface (`keys`), the `auto` choice (`chain`) and one background refresher
(`refresher`) that owns expiry. Import from the submodules: `config` imports `file`.

Decisions where the contract is silent:
- `auto` with no source at all is a startup error (`cannot start: no credentials found`),
  not a daemon that can never commit.
- A failed first fetch does not stop startup: the daemon serves, commits stay pending, and
  the refresher retries with backoff (5 s, then up to 30 s apart).
- Refresh starts when min(half the remaining life, 5 min) remains, up to 20% earlier
  (jitter). Keys that never expire (static keys, a file without `Expiration`) are read
  again only when the file's mtime changes or SLS refuses them.
- `ALIBABA_CLOUD_STS_ENDPOINT` (set by ACK's webhook, read by neither SDK) is used when
  `sls.oidc.sts_endpoint` is not set; then `ALIBABA_CLOUD_STS_REGION` (+ VPC), else
  `sts.aliyuncs.com`.
- `check-config` never contacts STS, the metadata service or the URI except the one-second
  metadata probe `auto` needs: it shows the source, and the key id and expiry it can know
  offline (static keys, a file).
"""
