-- The fencing token of the last holder of the flush lease that wrote here. Every write the
-- sidecar makes under the lease raises it in the same transaction, and is refused when a later
-- holder has raised it further: a holder that stalled past its lease cannot overwrite the
-- stored counts after another process took the lease (docs/design.md, *The flush lease*).
CREATE TABLE countersink_lease_fence (
    id SMALLINT NOT NULL PRIMARY KEY,
    token BIGINT NOT NULL
);
INSERT INTO countersink_lease_fence (id, token) VALUES (1, 0);
