DROP TABLE countersink_lease_fence;
