"""The tamper-evident audit log.

:mod:`hie.audit.chain` (record ids, canonical hashes, the link extension),
:mod:`hie.audit.log` (:class:`~hie.audit.log.AuditLog`: group commit of chained
AuditEvents with the request's data writes, the head and the signed seals) and
:mod:`hie.audit.verify` (streaming verification of the chain and its seals).
"""
