"""The `PG*` variables: the embedded server's libpq parameters for each libpq version (the checks of an external URL's
are in `test_database_url.py`, through `parse_database_url`)."""

from __future__ import annotations

from agentrt.db.pg_environment import embedded_libpq_parameters


def test_an_older_libpq_is_given_only_the_parameters_it_has() -> None:
    # An unknown parameter is "invalid URI query parameter" to libpq: each is named from the version that reads its
    # variable (`require_auth` from 16, `sslnegotiation` from 17, `min_protocol_version` from 18).
    newest = embedded_libpq_parameters(180006, 10.0)
    assert {'require_auth', 'sslnegotiation', 'min_protocol_version', 'gssencmode'} <= newest.keys()
    fifteen = embedded_libpq_parameters(150010, 10.0)
    assert 'gssencmode' in fifteen and fifteen.keys().isdisjoint({'require_auth', 'sslnegotiation', 'sslcertmode'})
    assert 'sslnegotiation' in embedded_libpq_parameters(170000, 10.0)


def test_the_connect_timeout_is_db_connect_timeouts_in_whole_seconds() -> None:
    assert embedded_libpq_parameters(180006, 10.0)['connect_timeout'] == '10'
    assert embedded_libpq_parameters(180006, 2.5)['connect_timeout'] == '3'
    assert embedded_libpq_parameters(180006, 0.5)['connect_timeout'] == '2'  # libpq's least
